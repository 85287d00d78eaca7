//! Validated topic names and filters, and the subscription trie.
//!
//! A [`TopicName`] is what a PUBLISH carries: no wildcards. A [`TopicFilter`] is
//! what a SUBSCRIBE carries: `+` and `#` allowed where the spec allows them
//! (MQTT-4.7.1-1..3). Both are parsed once at the edge; after that the type is
//! the proof of validity. Both wrap a [`ByteString`], so a topic decoded from a
//! packet is a slice of the read buffer, not a copy.

use bytestring::ByteString;
use std::fmt;

pub mod trie;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Topic names and filters are at least one character long (MQTT-4.7.3-1).
    Empty,
    /// `+` or `#` in a topic name (MQTT-3.3.2-2).
    WildcardInName,
    /// `#` not last or not alone in its level, or `+` not alone in its level
    /// (MQTT-4.7.1-2, MQTT-4.7.1-3).
    MisplacedWildcard,
    /// U+0000 in a topic (MQTT-4.7.3-2).
    NullCharacter,
    /// Longer than the 65,535 bytes a UTF-8 string can hold (MQTT-4.7.3-3).
    TooLong,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::Empty => "empty topic",
            TopicError::WildcardInName => "wildcard in a topic name",
            TopicError::MisplacedWildcard => "misplaced wildcard in a topic filter",
            TopicError::NullCharacter => "U+0000 in a topic",
            TopicError::TooLong => "topic longer than 65535 bytes",
        })
    }
}

impl std::error::Error for TopicError {}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// The first byte of `bytes` that is NUL, `+` or `#`, if any.
///
/// A topic name is checked for all three on every PUBLISH, so this looks at
/// eight bytes per step (the "has zero byte" trick applied to `word ^ c`)
/// rather than three byte-by-byte scans: it was 44% of a PUBLISH decode.
fn find_nul_or_wildcard(bytes: &[u8]) -> Option<u8> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_byte = |word: u64, c: u8| {
        let x = word ^ (LO * u64::from(c));
        x.wrapping_sub(LO) & !x & HI != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        if has_byte(word, 0) || has_byte(word, b'+') || has_byte(word, b'#') {
            return chunk
                .iter()
                .copied()
                .find(|&b| matches!(b, 0 | b'+' | b'#'));
        }
    }
    chunks
        .remainder()
        .iter()
        .copied()
        .find(|&b| matches!(b, 0 | b'+' | b'#'))
}

/// A topic a message is published to: no wildcards, no U+0000.
///
/// The one exception to "non-empty" is [`TopicName::alias_only`]: an MQTT 5
/// PUBLISH may leave its topic empty and name it by a Topic Alias instead
/// (MQTT 5 §3.3.2.3.4); the connection resolves the alias before routing.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(ByteString);

impl TopicName {
    /// Validates `s` as a topic name.
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let s = s.into();
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > u16::MAX as usize {
            return Err(TopicError::TooLong);
        }
        match find_nul_or_wildcard(s.as_bytes()) {
            None => Ok(TopicName(s)),
            Some(0) => Err(TopicError::NullCharacter),
            Some(_) => Err(TopicError::WildcardInName),
        }
    }

    /// The empty topic of an MQTT 5 PUBLISH that names its topic by alias.
    pub fn alias_only() -> Self {
        TopicName(ByteString::new())
    }

    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The underlying shared string.
    pub fn as_bytestring(&self) -> &ByteString {
        &self.0
    }

    /// True only for [`TopicName::alias_only`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True for topics beginning with `$`, which a leading wildcard does not
    /// match (MQTT-4.7.2-1).
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The `/`-separated levels.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicName({:?})", &*self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A subscription filter: levels separated by `/`, where `+` matches one
/// level and a final `#` matches any number of levels, its parent included.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(ByteString);

impl TopicFilter {
    /// Validates `s` as a topic filter.
    pub fn new(s: impl Into<ByteString>) -> Result<Self, TopicError> {
        let s = s.into();
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        check_common(&s)?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            let last = levels.peek().is_none();
            if level.contains('#') && (level != "#" || !last) {
                return Err(TopicError::MisplacedWildcard);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::MisplacedWildcard);
            }
        }
        Ok(TopicFilter(s))
    }

    /// The filter as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The underlying shared string.
    pub fn as_bytestring(&self) -> &ByteString {
        &self.0
    }

    /// True when the filter contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.0.bytes().any(|b| b == b'+' || b == b'#')
    }

    /// The `/`-separated levels.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// Whether this filter matches `topic`, by the rules of MQTT 4.7: `+` one
    /// level, a trailing `#` the rest (parent level included), and no leading
    /// wildcard matching a `$` topic (MQTT-4.7.2-1). The trie is the fast
    /// path; this is the reference it is checked against.
    pub fn matches(&self, topic: &TopicName) -> bool {
        if topic.is_dollar() && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut filter = self.levels();
        let mut name = topic.levels();
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicFilter({:?})", &*self.0)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for TopicFilter {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s.to_string()).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s.to_string()).unwrap()
    }

    #[test]
    fn topic_name_rejects_wildcards_mqtt_3_3_2_2() {
        assert_eq!(TopicName::new("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(TopicName::new("#"), Err(TopicError::WildcardInName));
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::NullCharacter));
        assert!(TopicName::new("/").is_ok());
    }

    #[test]
    fn nul_and_wildcards_found_at_every_offset() {
        for len in 1..40 {
            for pos in 0..len {
                for (c, err) in [
                    (0u8, TopicError::NullCharacter),
                    (b'+', TopicError::WildcardInName),
                    (b'#', TopicError::WildcardInName),
                ] {
                    let mut bytes = vec![b'a'; len];
                    bytes[pos] = c;
                    let s = String::from_utf8(bytes).unwrap();
                    assert_eq!(TopicName::new(s), Err(err), "len {len} pos {pos}");
                }
            }
            assert!(TopicName::new("a".repeat(len)).is_ok());
        }
        // Bytes that differ from the targets by one bit are not confused with them.
        assert!(TopicName::new("\u{1}*\"ab\u{7f}é/ü".to_string()).is_ok());
    }

    #[test]
    fn filter_wildcard_placement_mqtt_4_7_1_2_and_4_7_1_3() {
        for ok in ["#", "+", "a/#", "+/+", "/+", "a/+/b", "+/#", "$SYS/#"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in ["a#", "#/a", "a/b#", "a+", "a/+b", "++", "a/#/b"] {
            assert_eq!(
                TopicFilter::new(bad),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
    }

    #[test]
    fn matching_rules_mqtt_4_7() {
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1")));
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1/ranking")));
        assert!(f("sport/#").matches(&t("sport")));
        assert!(f("#").matches(&t("a/b/c")));
        assert!(f("sport/+").matches(&t("sport/")));
        assert!(!f("sport/+").matches(&t("sport")));
        assert!(f("+/+").matches(&t("/finance")));
        assert!(f("/+").matches(&t("/finance")));
        assert!(!f("+").matches(&t("/finance")));
        assert!(!f("a/b").matches(&t("a/b/c")));
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcard_mqtt_4_7_2_1() {
        assert!(!f("#").matches(&t("$SYS/uptime")));
        assert!(!f("+/uptime").matches(&t("$SYS/uptime")));
        assert!(f("$SYS/#").matches(&t("$SYS/uptime")));
        assert!(f("$SYS/+").matches(&t("$SYS/uptime")));
    }
}
