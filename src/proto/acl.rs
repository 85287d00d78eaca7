//! Topic access control: mosquitto's `acl_file` format, so files written for
//! mosquitto work as they are.
//!
//! ```text
//! # Lines before the first `user` line apply to anonymous clients.
//! topic read $SYS/#
//!
//! user alice
//! topic readwrite fleet/#
//! topic deny fleet/secret/#
//!
//! # `pattern` lines apply to every client, anywhere in the file:
//! # %c is the clientId, %u the username.
//! pattern write dev/%c/status
//! pattern read dev/%c/cmd
//! ```
//!
//! `topic [read|write|readwrite|deny] TOPIC` (access defaults to
//! `readwrite`), `user NAME`, `pattern [...] TOPIC`, blank lines and `#`
//! comments. Once a file is in use, what no rule grants is refused:
//!
//! - **SUBSCRIBE**: a filter is granted when a `read` rule covers it (the
//!   rule `fleet/#` covers `fleet/+/temp`; `fleet/+` does not cover
//!   `fleet/#`); otherwise its SUBACK code is 0x80 (MQTT-3.9.3: failure).
//! - **PUBLISH** (and wills): dropped unless a `write` rule matches the
//!   topic. The client is still acknowledged as usual, as mosquitto does: a
//!   3.1.1 client cannot be told.
//! - **delivery**: a message reaches a subscriber only if a `read` rule
//!   matches its topic, so `deny` rules hold inside a broader grant.
//!
//! A `deny` rule that matches wins over any grant. Rule topics are matched
//! as MQTT filters are, `$` rules included: `#` does not reach `$SYS/...`.
//! A `%c` or `%u` standing for an id that contains `/`, `+` or `#` makes the
//! pattern match nothing (an id must not widen its own rule).

use std::fmt;

use hashbrown::HashMap;

/// What a client asks to do with a topic or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe with this filter.
    Subscribe,
    /// Receive a message published to this topic.
    Read,
    /// Publish to this topic.
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Grant::ReadWrite, _)
                | (Grant::Read, Access::Read | Access::Subscribe)
                | (Grant::Write, Access::Write)
        )
    }
}

#[derive(Debug, Clone)]
struct Rule {
    grant: Grant,
    topic: String,
    /// `pattern` line: `%c` / `%u` are substituted per client.
    substitute: bool,
}

/// A parsed ACL file.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// A line of an ACL file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for AclParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl Acl {
    /// Parses the text of an ACL file.
    pub fn parse(text: &str) -> Result<Acl, AclParseError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |problem: String| AclParseError {
                line: i + 1,
                problem,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a name".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (grant, topic) = match rest.split_once(char::is_whitespace) {
                        Some((g, t)) if grant_word(g).is_some() => {
                            (grant_word(g).expect("checked"), t.trim())
                        }
                        _ => (Grant::ReadWrite, rest),
                    };
                    if topic.is_empty() {
                        return Err(err(format!("`{word}` needs a topic")));
                    }
                    if topic.contains(char::is_whitespace) {
                        return Err(err(format!("topic {topic:?} has spaces in it")));
                    }
                    check_rule_topic(topic).map_err(&err)?;
                    let rule = Rule {
                        grant,
                        topic: topic.to_string(),
                        substitute: word == "pattern",
                    };
                    match (word, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(u)) => acl.users.get_mut(u).expect("added above").push(rule),
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword {other:?} (expected topic, user or pattern)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// Whether the client (`username` if it logged in with one) may do
    /// `access` with `target` (a topic for Read/Write, a filter for
    /// Subscribe).
    pub fn allows(
        &self,
        username: Option<&str>,
        client_id: &str,
        access: Access,
        target: &str,
    ) -> bool {
        let own: &[Rule] = match username {
            Some(u) => self.users.get(u).map_or(&[], Vec::as_slice),
            None => &self.anonymous,
        };
        let mut granted = false;
        for rule in own.iter().chain(&self.patterns) {
            let topic = if rule.substitute {
                match substitute(&rule.topic, username, client_id) {
                    Some(t) => t,
                    None => continue,
                }
            } else {
                std::borrow::Cow::Borrowed(rule.topic.as_str())
            };
            let hit = match access {
                Access::Subscribe => covers(&topic, target),
                Access::Read | Access::Write => matches(&topic, target),
            };
            if !hit {
                continue;
            }
            if rule.grant == Grant::Deny {
                // For a subscription this is a deny that covers the whole
                // filter; a narrower one is enforced message by message, on
                // delivery (Read).
                return false;
            }
            granted |= rule.grant.allows(access);
        }
        granted
    }
}

fn grant_word(w: &str) -> Option<Grant> {
    match w {
        "read" => Some(Grant::Read),
        "write" => Some(Grant::Write),
        "readwrite" => Some(Grant::ReadWrite),
        "deny" => Some(Grant::Deny),
        _ => None,
    }
}

/// A rule's topic is an MQTT filter: `#` only as a whole last level, `+`
/// only as a whole level.
fn check_rule_topic(topic: &str) -> Result<(), String> {
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("topic {topic:?}: `#` must be a whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("topic {topic:?}: `+` must be a whole level"));
        }
    }
    Ok(())
}

/// `%c` → clientId, `%u` → username; `None` when the rule cannot apply (no
/// username for `%u`, or an id that would add levels or wildcards).
fn substitute<'a>(
    topic: &'a str,
    username: Option<&str>,
    client_id: &str,
) -> Option<std::borrow::Cow<'a, str>> {
    if !topic.contains('%') {
        return Some(std::borrow::Cow::Borrowed(topic));
    }
    let unsafe_id = |s: &str| s.contains(['/', '+', '#']) || s.is_empty();
    let mut out = topic.to_string();
    if out.contains("%c") {
        if unsafe_id(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    if out.contains("%u") {
        let u = username?;
        if unsafe_id(u) {
            return None;
        }
        out = out.replace("%u", u);
    }
    Some(std::borrow::Cow::Owned(out))
}

/// Filter `rule` matches topic `topic` (MQTT §4.7, `$` rule included).
fn matches(rule: &str, topic: &str) -> bool {
    let mut r = rule.split('/');
    let mut t = topic.split('/');
    let mut first = true;
    loop {
        match (r.next(), t.next()) {
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("#"), None) => return true,
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// Rule filter `rule` covers every topic subscription filter `filter` can
/// match: `#` covers the rest, `+` covers one level (a `+` or a literal, not
/// `#`), a literal only itself.
fn covers(rule: &str, filter: &str) -> bool {
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    let mut first = true;
    loop {
        match (r.next(), f.next()) {
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("#"), None) => return true,
            (Some("+"), Some(level)) => {
                if level == "#" || (first && level.starts_with('$')) {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients may read $SYS
topic read $SYS/#

user alice
topic readwrite fleet/#
topic deny fleet/secret/#
topic write alerts

user bob
topic fleet/+/temp

pattern write dev/%c/status
pattern read dev/%u/cmd
";

    fn acl() -> Acl {
        Acl::parse(FILE).unwrap()
    }

    #[test]
    fn anonymous_rules_come_before_the_first_user_line() {
        let a = acl();
        assert!(a.allows(None, "x", Access::Subscribe, "$SYS/#"));
        assert!(a.allows(None, "x", Access::Read, "$SYS/broker/uptime"));
        assert!(!a.allows(None, "x", Access::Write, "$SYS/broker/uptime"));
        assert!(!a.allows(None, "x", Access::Subscribe, "fleet/#"));
        // A user gets only its own rules (and the patterns).
        assert!(!a.allows(Some("alice"), "x", Access::Read, "$SYS/broker/uptime"));
    }

    #[test]
    fn subscribe_needs_a_read_rule_that_covers_the_whole_filter() {
        let a = acl();
        assert!(a.allows(Some("alice"), "x", Access::Subscribe, "fleet/#"));
        assert!(a.allows(Some("alice"), "x", Access::Subscribe, "fleet/+/temp"));
        assert!(!a.allows(Some("alice"), "x", Access::Subscribe, "#"));
        // bob's `fleet/+/temp` covers `fleet/7/temp` but not `fleet/#`.
        assert!(a.allows(Some("bob"), "x", Access::Subscribe, "fleet/7/temp"));
        assert!(a.allows(Some("bob"), "x", Access::Subscribe, "fleet/+/temp"));
        assert!(!a.allows(Some("bob"), "x", Access::Subscribe, "fleet/#"));
        assert!(!a.allows(Some("bob"), "x", Access::Subscribe, "fleet/+/#"));
        // Write-only grants no subscription.
        assert!(!a.allows(Some("alice"), "x", Access::Subscribe, "alerts"));
        // Unknown users get nothing but the patterns.
        assert!(!a.allows(Some("mallory"), "x", Access::Subscribe, "fleet/#"));
    }

    #[test]
    fn deny_wins_inside_a_broader_grant() {
        let a = acl();
        assert!(a.allows(Some("alice"), "x", Access::Read, "fleet/1/temp"));
        assert!(!a.allows(Some("alice"), "x", Access::Read, "fleet/secret/key"));
        assert!(!a.allows(Some("alice"), "x", Access::Write, "fleet/secret/key"));
        assert!(!a.allows(Some("alice"), "x", Access::Subscribe, "fleet/secret/#"));
        // `fleet/#` is still allowed; its secret messages are held back on
        // delivery (Read above).
        assert!(a.allows(Some("alice"), "x", Access::Subscribe, "fleet/#"));
    }

    #[test]
    fn patterns_substitute_client_id_and_username_safely() {
        let a = acl();
        assert!(a.allows(None, "dev7", Access::Write, "dev/dev7/status"));
        assert!(!a.allows(None, "dev7", Access::Write, "dev/dev8/status"));
        assert!(a.allows(Some("bob"), "c", Access::Subscribe, "dev/bob/cmd"));
        // %u needs a username; ids with wildcards or slashes match nothing.
        assert!(!a.allows(None, "c", Access::Subscribe, "dev//cmd"));
        assert!(!a.allows(None, "a/b", Access::Write, "dev/a/b/status"));
        assert!(!a.allows(None, "+", Access::Write, "dev/x/status"));
    }

    #[test]
    fn wildcard_rules_do_not_reach_dollar_topics_mqtt_4_7_2_1() {
        let a = Acl::parse("topic readwrite #\ntopic read +/x\n").unwrap();
        assert!(a.allows(None, "c", Access::Read, "a/b"));
        assert!(!a.allows(None, "c", Access::Read, "$SYS/broker/uptime"));
        assert!(!a.allows(None, "c", Access::Subscribe, "$SYS/#"));
        assert!(!a.allows(None, "c", Access::Read, "$x/x"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(Acl::parse("topic read a\nusr bob\n").unwrap_err().line, 2);
        assert!(Acl::parse("topic read a/#/b\n")
            .unwrap_err()
            .problem
            .contains("whole last level"));
        assert!(Acl::parse("user\n").is_err());
        assert!(Acl::parse("topic\n")
            .unwrap_err()
            .problem
            .contains("needs a topic"));
        // One word after `topic` is the topic (mosquitto reads it so too).
        let a = Acl::parse("topic read\n").unwrap();
        assert!(a.allows(None, "c", Access::Write, "read"));
        // Access defaults to readwrite, as in mosquitto.
        let a = Acl::parse("topic a/b\n").unwrap();
        assert!(a.allows(None, "c", Access::Write, "a/b"));
        assert!(a.allows(None, "c", Access::Subscribe, "a/b"));
    }
}
