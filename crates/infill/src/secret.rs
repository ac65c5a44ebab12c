//! Secrets never leave infill: URL passwords, `${VAR}` values and params of
//! type `secret` are masked in every message, log line, plan and state row.
//! The redactor is built once from the validated spec and applied at the
//! edges (error text, audit log, status).

/// Replaces the password of a URL (`scheme://user:PASS@host/...`) with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let authority_end = url[rest_start..]
        .find(['/', '?', '#'])
        .map(|i| rest_start + i)
        .unwrap_or(url.len());
    let authority = &url[rest_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return redact_query_password(url);
    };
    let userinfo = &authority[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    redact_query_password(&format!("{}{}{}", &url[..rest_start], masked, &url[rest_start + at..]))
}

fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_string();
    };
    let (head, query) = url.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{head}{}", parts.join("&"))
}

/// The password of a URL, if it has one (to mask it wherever it may echo).
pub fn url_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let pass = &userinfo[userinfo.find(':')? + 1..];
    (!pass.is_empty()).then(|| pass.to_string())
}

/// Masks known secret strings wherever they appear.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    /// Registers a secret; strings shorter than 4 characters are ignored
    /// (masking "1" everywhere would garble every number).
    pub fn add(&mut self, secret: impl Into<String>) {
        let s = secret.into();
        if s.len() >= 4 && !self.secrets.contains(&s) {
            self.secrets.push(s);
            // Longest first, so a secret containing another is masked whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// Registers a URL's password and any percent-decoded form of it.
    pub fn add_url(&mut self, url: &str) {
        if let Some(p) = url_password(url) {
            self.add(percent_decode(&p));
            self.add(p);
        }
    }

    /// The text with every secret replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/prod?sslmode=require"),
            "postgres://app:***@db:5432/prod?sslmode=require"
        );
        assert_eq!(redact_url("mysql://root@127.0.0.1/x"), "mysql://root@127.0.0.1/x");
        assert_eq!(redact_url("sqlite:demo.db"), "sqlite:demo.db");
        assert_eq!(
            redact_url("postgres://h/db?user=a&password=hunter22"),
            "postgres://h/db?user=a&password=***"
        );
        assert_eq!(url_password("postgres://app:pw%40x@h/db").as_deref(), Some("pw%40x"));
    }

    #[test]
    fn redactor_masks_decoded_and_raw_forms() {
        let mut r = Redactor::default();
        r.add_url("postgres://app:pw%40xyz@h/db");
        assert_eq!(r.mask("failed for pw@xyz and pw%40xyz"), "failed for *** and ***");
    }
}
