//! Just enough JSON for the flat one-line objects our client scripts print
//! (serde_json is not among the crate's dependencies).
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Parses `{"k": v, ...}` with string, number, bool, null values, and
/// keeps arrays/objects as raw text.
pub fn parse_object(s: &str) -> Option<HashMap<String, Value>> {
    let s = s.trim();
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    let b = inner.as_bytes();
    let mut i = 0;
    let mut map = HashMap::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] as char).is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            return Some(map);
        }
        let (key, next) = string_at(inner, i)?;
        i = next;
        skip_ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let (val, next) = value_at(inner, i)?;
        map.insert(key, val);
        i = next;
        skip_ws(&mut i);
        match b.get(i) {
            Some(b',') => i += 1,
            None => return Some(map),
            _ => return None,
        }
    }
}

fn string_at(s: &str, i: usize) -> Option<(String, usize)> {
    let b = s.as_bytes();
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut out = String::new();
    let mut chars = s[i + 1..].char_indices();
    while let Some((j, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1 + j + 1)),
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex: String =
                            (0..4).filter_map(|_| chars.next()).map(|x| x.1).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => out.push(other),
                }
            }
            c => out.push(c),
        }
    }
    None
}

fn value_at(s: &str, i: usize) -> Option<(Value, usize)> {
    let b = s.as_bytes();
    match *b.get(i)? {
        b'"' => string_at(s, i).map(|(v, n)| (Value::Str(v), n)),
        b't' if s[i..].starts_with("true") => Some((Value::Bool(true), i + 4)),
        b'f' if s[i..].starts_with("false") => Some((Value::Bool(false), i + 5)),
        b'n' if s[i..].starts_with("null") => Some((Value::Null, i + 4)),
        b'[' | b'{' => {
            let (open, close) = if b[i] == b'[' {
                (b'[', b']')
            } else {
                (b'{', b'}')
            };
            let mut depth = 0;
            let mut in_str = false;
            let mut j = i;
            while j < b.len() {
                let c = b[j];
                if in_str {
                    if c == b'\\' {
                        j += 1;
                    } else if c == b'"' {
                        in_str = false;
                    }
                } else if c == b'"' {
                    in_str = true;
                } else if c == open {
                    depth += 1;
                } else if c == close {
                    depth -= 1;
                    if depth == 0 {
                        return Some((Value::Other(s[i..=j].to_string()), j + 1));
                    }
                }
                j += 1;
            }
            None
        }
        _ => {
            let end = s[i..]
                .find(|c: char| c == ',' || c.is_whitespace())
                .map_or(s.len(), |e| i + e);
            Some((Value::Num(s[i..end].parse().ok()?), end))
        }
    }
}
