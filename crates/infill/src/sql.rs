//! SQL fragments from a spec, with their `:name` parameters found once, so a
//! value is always bound and never pasted. The scanner knows string literals,
//! quoted identifiers, comments, PostgreSQL dollar quotes and `::` casts, so a
//! colon inside any of them is left alone.

use crate::value::Value;

/// One piece of a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// SQL text, copied as is.
    Sql(String),
    /// A named parameter, bound at execution.
    Param(String),
}

/// A parsed SQL fragment from a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The text as the user wrote it.
    pub source: String,
    /// Text and parameters, in order.
    pub parts: Vec<Part>,
}

impl Fragment {
    /// Parses `sql`. `backslash_escapes` is true for MySQL, whose string
    /// literals treat `\'` as an escaped quote.
    pub fn parse(sql: &str, backslash_escapes: bool) -> Result<Fragment, String> {
        let b = sql.as_bytes();
        let mut parts = Vec::new();
        let mut text_start = 0;
        let mut i = 0;
        let flush = |parts: &mut Vec<Part>, from: usize, to: usize| {
            if to > from {
                parts.push(Part::Sql(sql[from..to].to_string()));
            }
        };
        while i < b.len() {
            match b[i] {
                q @ (b'\'' | b'"' | b'`') => {
                    let escapes = q == b'\'' && (backslash_escapes || (i > 0 && matches!(b[i - 1], b'E' | b'e')));
                    i = skip_quoted(b, i, q, escapes)
                        .ok_or_else(|| format!("unterminated {} at byte {i}", quote_name(q)))?;
                }
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p + 1);
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i = find(b, i + 2, b"*/").ok_or("unterminated /* comment")? + 2;
                }
                b'$' => {
                    // A dollar-quoted string: $$...$$ or $tag$...$tag$.
                    let tag_end = b[i + 1..]
                        .iter()
                        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
                        .map(|p| i + 1 + p);
                    match tag_end {
                        Some(e) if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) => {
                            let tag = &b[i..=e];
                            i = find(b, e + 1, tag).ok_or("unterminated dollar-quoted string")? + tag.len();
                        }
                        _ => i += 1,
                    }
                }
                b':' if b.get(i + 1) == Some(&b':') => i += 2,
                b':' if b.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
                    && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
                {
                    let end = b[i + 1..]
                        .iter()
                        .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                        .map_or(b.len(), |p| i + 1 + p);
                    flush(&mut parts, text_start, i);
                    parts.push(Part::Param(sql[i + 1..end].to_string()));
                    i = end;
                    text_start = end;
                }
                _ => i += 1,
            }
        }
        flush(&mut parts, text_start, b.len());
        Ok(Fragment {
            source: sql.to_string(),
            parts,
        })
    }

    /// The names of the parameters it uses, each once, in order of first use.
    pub fn params(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Param(n) = p
                && !out.contains(&n.as_str())
            {
                out.push(n);
            }
        }
        out
    }
}

/// An identifier as a predicate spells it: unquoted (the server folds its
/// case) or quoted (exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    pub name: String,
    pub quoted: bool,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Other(char),
    Literal,
}

impl Fragment {
    /// True when the text may name one of `names` (a word or a quoted
    /// identifier, compared without case), or cannot be scanned.
    pub fn may_mention(&self, names: &[&str]) -> bool {
        let Some(tokens) = tokens(&self.source) else {
            return true;
        };
        tokens.iter().any(|t| match t {
            Token::Word(w) | Token::Quoted(w) => names.iter().any(|n| n.eq_ignore_ascii_case(w)),
            _ => false,
        })
    }

    /// The columns this predicate requires to be NULL: its top-level
    /// conjuncts of the exact form `column IS NULL`. A row it admits holds
    /// NULL there, so a write guarded by it needs no read of the before value.
    ///
    /// Deliberately narrow: a predicate with a comment, a dollar quote, or
    /// `OR`, `XOR`, `BETWEEN`, `CASE`, `|`, `&` outside parentheses yields
    /// nothing, since a wrong answer would make undo put NULL over a value.
    pub fn null_conjuncts(&self) -> Vec<Ident> {
        // A backslash may escape a quote (MySQL strings, in '...' and
        // "..."), or not (PostgreSQL): where it is, the scan could end a
        // literal in the wrong place and see a conjunct that is not there.
        if self.source.contains('\\') {
            return Vec::new();
        }
        let Some(tokens) = tokens(&self.source) else {
            return Vec::new();
        };
        let mut depth = 0i32;
        let mut terms: Vec<Vec<&Token>> = vec![Vec::new()];
        for t in &tokens {
            match t {
                Token::Other('(' | '[') => depth += 1,
                Token::Other(')' | ']') => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                match t {
                    Token::Word(w)
                        if ["OR", "XOR", "BETWEEN", "CASE"]
                            .iter()
                            .any(|k| w.eq_ignore_ascii_case(k)) =>
                    {
                        return Vec::new();
                    }
                    Token::Other('|' | '&') => return Vec::new(),
                    Token::Word(w) if w.eq_ignore_ascii_case("AND") => {
                        terms.push(Vec::new());
                        continue;
                    }
                    _ => {}
                }
            }
            if let Some(last) = terms.last_mut() {
                last.push(t);
            }
        }
        if depth != 0 {
            return Vec::new();
        }
        let word = |t: &Token, k: &str| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case(k));
        terms
            .iter()
            .filter_map(|term| match term.as_slice() {
                [col, is, null] if word(is, "IS") && word(null, "NULL") => match col {
                    Token::Word(w)
                        if !["NOT", "NULL", "TRUE", "FALSE"]
                            .iter()
                            .any(|k| w.eq_ignore_ascii_case(k)) =>
                    {
                        Some(Ident {
                            name: w.clone(),
                            quoted: false,
                        })
                    }
                    Token::Quoted(q) => Some(Ident {
                        name: q.clone(),
                        quoted: true,
                    }),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }
}

/// Words, quoted identifiers, literals and single characters; `None` for
/// text this scanner does not follow (comments, dollar quotes, an open quote).
fn tokens(sql: &str) -> Option<Vec<Token>> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let end = b[i..]
                .iter()
                .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_' || x == b'$' || x >= 0x80))
                .map_or(b.len(), |p| i + p);
            out.push(Token::Word(sql[i..end].to_string()));
            i = end;
        } else if c.is_ascii_digit() {
            let end = b[i..]
                .iter()
                .position(|&x| !(x.is_ascii_alphanumeric() || x == b'.' || x == b'_'))
                .map_or(b.len(), |p| i + p);
            out.push(Token::Literal);
            i = end;
        } else if c == b'"' || c == b'`' {
            let end = skip_quoted(b, i, c, false)?;
            let q = c as char;
            let inner = sql[i + 1..end - 1].replace(&format!("{q}{q}"), &q.to_string());
            out.push(Token::Quoted(inner));
            i = end;
        } else if c == b'\'' {
            // Backslashes as escapes, or not: either way the literal is
            // opaque; a guess that ends it early only shortens a term.
            i = skip_quoted(b, i, c, true).or_else(|| skip_quoted(b, i, c, false))?;
            out.push(Token::Literal);
        } else if (c == b'-' && b.get(i + 1) == Some(&b'-'))
            || (c == b'/' && b.get(i + 1) == Some(&b'*'))
            || c == b'$'
            || c == b'#'
        {
            return None;
        } else {
            let ch = sql[i..].chars().next()?;
            out.push(Token::Other(ch));
            i += ch.len_utf8();
        }
    }
    Some(out)
}

fn quote_name(q: u8) -> &'static str {
    match q {
        b'\'' => "string literal",
        b'"' => "quoted identifier",
        _ => "backquoted identifier",
    }
}

fn skip_quoted(b: &[u8], start: usize, q: u8, backslash: bool) -> Option<usize> {
    let mut i = start + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

/// A statement being assembled: text plus the values bound to its
/// placeholders, numbered for the dialect as they are pushed.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub sql: String,
    pub args: Vec<Value>,
}

impl Query {
    pub fn new(sql: impl Into<String>) -> Query {
        Query {
            sql: sql.into(),
            args: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sql: &str) -> Vec<String> {
        Fragment::parse(sql, false)
            .unwrap()
            .params()
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn finds_named_params_outside_literals_and_casts() {
        assert_eq!(params("block_id = :block AND x::int > :min_x"), ["block", "min_x"]);
        assert_eq!(
            params("note = ':not_a_param' AND \"weird:col\" = 1"),
            Vec::<String>::new()
        );
        assert_eq!(params("a = 'it''s :x' -- :comment\n AND b = :b"), ["b"]);
        assert_eq!(params("/* :c */ $$ :d $$ $t$ :e $t$ = :f"), ["f"]);
        assert_eq!(params("x = :a OR y = :a"), ["a"]);
        assert_eq!(params("t.created_at::date = :day"), ["day"]);
    }

    #[test]
    fn mysql_backslash_escapes() {
        let f = Fragment::parse(r"a = 'it\'s :x' AND b = :b", true).unwrap();
        assert_eq!(f.params(), ["b"]);
    }

    #[test]
    fn null_conjuncts_only_where_certain() {
        let pinned = |sql: &str| -> Vec<String> {
            Fragment::parse(sql, false)
                .unwrap()
                .null_conjuncts()
                .into_iter()
                .map(|i| if i.quoted { format!("\"{}\"", i.name) } else { i.name })
                .collect()
        };
        assert_eq!(pinned("c IS NULL"), ["c"]);
        assert_eq!(pinned("  c  is   null "), ["c"]);
        assert_eq!(pinned("a > :min AND c IS NULL AND (d = 1 OR e IS NULL)"), ["c"]);
        assert_eq!(pinned("\"Full Name\" IS NULL and b is null"), ["\"Full Name\"", "b"]);
        assert_eq!(pinned("s = 'x AND c IS NULL' AND c IS NULL"), ["c"]);
        assert_eq!(pinned("a || b = 'x' AND c IS NULL"), Vec::<String>::new());
        for unsure in [
            "c IS NULL OR d = 1",
            "NOT c IS NULL",
            "c IS NOT NULL",
            "a BETWEEN 1 AND c IS NULL",
            "CASE WHEN x THEN 1 END = 1 AND c IS NULL",
            "c IS NULL -- AND OR",
            "t.c IS NULL",
            "x = c IS NULL",
            "c IS NULL XOR d",
            "(c IS NULL",
            "$$a$$ = 'a' AND c IS NULL",
            "c ISNULL",
            // MySQL reads one string here; a scan without escapes, two
            // strings around a `c IS NULL`.
            r#"x = "a\" AND c IS NULL AND \"" "#,
            r"x = 'a\' AND c IS NULL AND \'' ",
        ] {
            assert_eq!(pinned(unsure), Vec::<String>::new(), "{unsure}");
        }
    }

    #[test]
    fn may_mention_finds_names_in_words_and_quotes() {
        let f = |sql: &str| Fragment::parse(sql, false).unwrap();
        assert!(f("a + 1").may_mention(&["a", "b"]));
        assert!(f("concat(t.`Status`, 'x')").may_mention(&["status"]));
        assert!(f("\"B\" * 2").may_mention(&["b"]));
        assert!(!f("'a' || x").may_mention(&["a"]));
        assert!(!f("id * 5").may_mention(&["a", "b"]));
    }

    #[test]
    fn unterminated_literal_is_an_error() {
        assert!(Fragment::parse("a = 'open", false).is_err());
    }

    #[test]
    fn parts_keep_the_text() {
        let f = Fragment::parse("a = :x AND b", false).unwrap();
        assert_eq!(
            f.parts,
            vec![
                Part::Sql("a = ".into()),
                Part::Param("x".into()),
                Part::Sql(" AND b".into())
            ]
        );
    }
}
