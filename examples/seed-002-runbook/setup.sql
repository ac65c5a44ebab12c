-- Seed 002's world, small: parties, the contacts and users that point at
-- them, and waitlist entries whose party was never filled in, or points at
-- a party that does not exist (orphans). Quoted, mixed-case names as in the
-- Prisma schema the runbook was written for.
DROP TABLE IF EXISTS "WaitlistEntry", "User", "Contact", "Party";

CREATE TABLE "Party" (
  id BIGINT PRIMARY KEY,
  "tenantId" INTEGER NOT NULL,
  type TEXT NOT NULL,
  name TEXT NOT NULL
);
CREATE TABLE "Contact" (
  id BIGINT PRIMARY KEY,
  "tenantId" INTEGER NOT NULL,
  "partyId" BIGINT
);
CREATE TABLE "User" (
  id BIGINT PRIMARY KEY,
  "contactId" BIGINT NOT NULL REFERENCES "Contact" (id),
  "partyId" BIGINT
);
CREATE TABLE "WaitlistEntry" (
  id BIGINT PRIMARY KEY,
  "tenantId" INTEGER NOT NULL,
  "contactId" BIGINT REFERENCES "Contact" (id),
  "clientPartyId" BIGINT
);

-- 2,000 parties; 2,500 contacts, the last 500 without a party.
INSERT INTO "Party" SELECT g, 1 + g % 3, 'CONTACT', 'party ' || g FROM generate_series(1, 2000) g;
INSERT INTO "Contact" SELECT g, 1 + g % 3, CASE WHEN g <= 2000 THEN g END FROM generate_series(1, 2500) g;
-- Users: none has its partyId yet.
INSERT INTO "User" SELECT g, g, NULL FROM generate_series(1, 1500) g;
-- Waitlist: 6,000 entries. Most lack clientPartyId; every 50th points at a
-- party id above 2,000 that does not exist (an orphan, 40 distinct ids).
INSERT INTO "WaitlistEntry"
SELECT g, 1 + g % 3, 1 + g % 2500,
       CASE WHEN g % 50 = 0 THEN 2000 + 1 + (g / 50) % 40 END
FROM generate_series(1, 6000) g;
