//! Recognising and rewriting the commands that cancel a query or end a connection by its id.
//!
//! Drivers cancel a running query by opening a second connection and sending `KILL QUERY <id>`,
//! with the id the server gave the first connection in its greeting (MariaDB and MySQL
//! Connector/J for query timeouts and `Statement.cancel`, the `mariadb` CLI on Ctrl-C). A front
//! end that greets clients itself hands out ids of its own, so it must find these commands and
//! put the real id in. Two forms exist:
//!
//! ```text
//! COM_QUERY         0x03 | "KILL [HARD | SOFT] [CONNECTION | QUERY] <id>" (any case, comments
//!                          and a trailing ';' allowed; the MySQL CLI sends
//!                          "KILL /*!50000 QUERY */ <id>")
//! COM_PROCESS_KILL  0x0c | id u32
//! ```
//!
//! `KILL QUERY ID <query id>` names a query, not a connection, and `KILL USER <name>` a user:
//! neither is a connection id, and both pass unchanged. So does any statement that only starts
//! like one (`KILL <expression>`): only a plain decimal id is rewritten.

use std::ops::Range;

/// `COM_QUERY`: a statement as text.
pub const COM_QUERY: u8 = 0x03;
/// `COM_PROCESS_KILL`: ends the connection with the u32 id that follows.
pub const COM_PROCESS_KILL: u8 = 0x0c;

/// The longest `COM_QUERY` payload that is read as a possible `KILL`: a real one is a few dozen
/// bytes, and a longer one passes unchanged rather than being held back.
pub const KILL_LIMIT: usize = 256;

/// How far into a statement the first word is looked for before it is taken for something
/// other than `KILL` (leading whitespace and comments).
const PREFIX_LIMIT: usize = 64;

/// A command that names a connection by its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    /// The connection id named.
    pub id: u64,
    /// Where the id's digits are in the payload; `None` for `COM_PROCESS_KILL`.
    digits: Option<Range<usize>>,
}

/// Whether the start of a statement is a `KILL`, as far as the bytes seen so far tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefix {
    /// It starts with the word `KILL`.
    Kill,
    /// It does not.
    Other,
    /// More bytes are needed to tell.
    Unknown,
}

impl Kill {
    /// Reads a command payload (command byte included): `Some` for a `COM_PROCESS_KILL`, or a
    /// `COM_QUERY` `KILL` statement with a plain decimal id.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        match payload.split_first()? {
            (&COM_PROCESS_KILL, rest) => {
                let id: [u8; 4] = rest.try_into().ok()?;
                Some(Self {
                    id: u64::from(u32::from_le_bytes(id)),
                    digits: None,
                })
            }
            (&COM_QUERY, text) if text.len() < KILL_LIMIT => {
                let digits = kill_statement(text)?;
                let id = std::str::from_utf8(text.get(digits.clone())?)
                    .ok()?
                    .parse()
                    .ok()?;
                Some(Self {
                    id,
                    digits: Some(digits.start + 1..digits.end + 1),
                })
            }
            _ => None,
        }
    }

    /// `payload` (the command this was parsed from) naming connection `id` instead.
    pub fn with_id(&self, payload: &[u8], id: u32) -> Vec<u8> {
        match &self.digits {
            None => {
                let mut out = vec![COM_PROCESS_KILL];
                out.extend_from_slice(&id.to_le_bytes());
                out
            }
            Some(digits) => {
                let (head, tail) = (
                    payload.get(..digits.start).unwrap_or_default(),
                    payload.get(digits.end..).unwrap_or_default(),
                );
                let mut out = Vec::with_capacity(payload.len() + 10);
                out.extend_from_slice(head);
                out.extend_from_slice(id.to_string().as_bytes());
                out.extend_from_slice(tail);
                out
            }
        }
    }
}

/// A `COM_QUERY` payload that makes the server itself answer a `KILL` of connection `id` with
/// the error it gives for an id it does not know (1094, "Unknown thread id"): the answer comes
/// from the server, in order with everything else the client has sent.
pub fn unknown_thread(id: u64) -> Vec<u8> {
    let mut out = vec![COM_QUERY];
    out.extend_from_slice(
        format!(
            "SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1094, MESSAGE_TEXT = \
             'Unknown thread id: {id} (postern: not a connection of this client through this \
             front end)'"
        )
        .as_bytes(),
    );
    out
}

/// Whether statement text that starts with `text` starts with the word `KILL`; `complete`
/// when `text` is the whole statement.
pub(super) fn prefix(text: &[u8], complete: bool) -> Prefix {
    let mut lex = Lexer::new(text);
    lex.skip();
    if lex.pos >= PREFIX_LIMIT {
        return Prefix::Other;
    }
    if lex.stalled {
        return if complete {
            Prefix::Other
        } else {
            Prefix::Unknown
        };
    }
    let rest = &text[lex.pos..];
    if !complete
        && (matches!(rest, [b'/'] | [b'-'] | [b'-', b'-']) || lex.versioned && rest == b"*")
    {
        // The start of a comment (or, inside a versioned comment, of its `*/`), or not: the
        // next byte tells.
        return Prefix::Unknown;
    }
    let word_end = rest.iter().position(|b| !is_word(*b)).unwrap_or(rest.len());
    if word_end == rest.len() && !complete && rest.len() <= 4 {
        // "KI" may become "KILL", and "KILL" may become "KILLER".
        return if b"kill".starts_with(&rest.to_ascii_lowercase()) {
            Prefix::Unknown
        } else {
            Prefix::Other
        };
    }
    if rest[..word_end].eq_ignore_ascii_case(b"kill") {
        Prefix::Kill
    } else {
        Prefix::Other
    }
}

/// The byte range of the id in a whole `KILL [HARD|SOFT] [CONNECTION|QUERY] <id>` statement.
fn kill_statement(text: &[u8]) -> Option<Range<usize>> {
    let mut lex = Lexer::new(text);
    if !lex.word()?.eq_ignore_ascii_case(b"kill") {
        return None;
    }
    let mut word = lex.word()?;
    if word.eq_ignore_ascii_case(b"hard") || word.eq_ignore_ascii_case(b"soft") {
        word = lex.word()?;
    }
    if word.eq_ignore_ascii_case(b"connection") || word.eq_ignore_ascii_case(b"query") {
        word = lex.word()?;
    }
    // Only a plain decimal id: `KILL QUERY ID n` names a query, `KILL USER u` a user.
    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let end = lex.pos;
    let digits = end - word.len()..end;
    lex.skip();
    if text.get(lex.pos) == Some(&b';') {
        lex.pos += 1;
        lex.skip();
    }
    (lex.pos == text.len() && !lex.stalled).then_some(digits)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// Words and numbers of a statement, past whitespace and comments. The text inside a versioned
/// comment (`/*!50000 QUERY */`, MariaDB's `/*M!100100 ... */`) is read as statement text,
/// since the server executes it.
struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
    /// Inside a versioned comment, whose `*/` is skipped like whitespace.
    versioned: bool,
    /// The text ended inside a comment.
    stalled: bool,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a [u8]) -> Self {
        Self {
            text,
            pos: 0,
            versioned: false,
            stalled: false,
        }
    }

    /// Skips whitespace and comments.
    fn skip(&mut self) {
        loop {
            let rest = &self.text[self.pos..];
            match rest {
                [b, ..] if b.is_ascii_whitespace() => self.pos += 1,
                [b'*', b'/', ..] if self.versioned => {
                    self.versioned = false;
                    self.pos += 2;
                }
                [b'/', b'*', b'!', ..] | [b'/', b'*', b'M', b'!', ..] if !self.versioned => {
                    let opener = if rest[2] == b'!' { 3 } else { 4 };
                    let digits = rest[opener..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .count();
                    self.pos += opener + digits;
                    self.versioned = true;
                }
                [b'/', b'*', ..] => match find(&rest[2..], b"*/") {
                    Some(end) => self.pos += 2 + end + 2,
                    None => {
                        self.pos = self.text.len();
                        self.stalled = true;
                        return;
                    }
                },
                [b'#', ..] | [b'-', b'-', b' ' | b'\t' | b'\n', ..] => {
                    match rest.iter().position(|b| *b == b'\n') {
                        Some(end) => self.pos += end + 1,
                        None => {
                            self.pos = self.text.len();
                            return;
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// The next word (letters, digits, `_`, `$`), past whitespace and comments.
    fn word(&mut self) -> Option<&'a [u8]> {
        self.skip();
        let rest = &self.text[self.pos..];
        let len = rest.iter().take_while(|b| is_word(**b)).count();
        self.pos += len;
        (len > 0).then(|| &rest[..len])
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(text: &str) -> Vec<u8> {
        let mut p = vec![COM_QUERY];
        p.extend_from_slice(text.as_bytes());
        p
    }

    #[test]
    fn what_drivers_send_is_recognised_and_rewritten() {
        for (text, id, rewritten) in [
            // mariadb CLI (Ctrl-C), Connector/J (timeouts, cancel), mysql_async users.
            ("KILL QUERY 3000000001", 3_000_000_001, "KILL QUERY 42"),
            ("KILL 3000000001", 3_000_000_001, "KILL 42"),
            // The MySQL CLI.
            (
                "KILL /*!50000 QUERY */ 3000000001",
                3_000_000_001,
                "KILL /*!50000 QUERY */ 42",
            ),
            (
                "  kill hard connection 17 ;  ",
                17,
                "  kill hard connection 42 ;  ",
            ),
            (
                "/* cancel */ Kill Soft Query\n7;",
                7,
                "/* cancel */ Kill Soft Query\n42;",
            ),
            (
                "KILL /*M!100100 QUERY */ 9",
                9,
                "KILL /*M!100100 QUERY */ 42",
            ),
        ] {
            let payload = query(text);
            let kill = Kill::parse(&payload).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(kill.id, id, "{text}");
            assert_eq!(kill.with_id(&payload, 42), query(rewritten), "{text}");
        }
        let binary = [COM_PROCESS_KILL, 0x01, 0x00, 0x00, 0xb3];
        let kill = Kill::parse(&binary).unwrap();
        assert_eq!(kill.id, 0xb300_0001);
        assert_eq!(kill.with_id(&binary, 42), [COM_PROCESS_KILL, 42, 0, 0, 0]);
    }

    #[test]
    fn other_statements_are_not_kills() {
        for text in [
            "KILL QUERY ID 5",
            "KILL USER app",
            "KILL CONNECTION_ID()",
            "KILL 5 + 1",
            "KILL 5; SELECT 1",
            "SELECT 'KILL 5'",
            "KILLER 5",
            "KILL",
            "KILL /* 5",
            "KILL -5",
        ] {
            assert_eq!(Kill::parse(&query(text)), None, "{text}");
        }
        assert_eq!(Kill::parse(&[COM_PROCESS_KILL, 1, 2, 3]), None);
        let long = format!("KILL {}5", " ".repeat(KILL_LIMIT));
        assert_eq!(Kill::parse(&query(&long)), None);
    }

    #[test]
    fn the_prefix_tells_kill_from_other_statements_early() {
        assert_eq!(prefix(b"SELECT 1", false), Prefix::Other);
        assert_eq!(prefix(b"S", false), Prefix::Other);
        assert_eq!(prefix(b"KILL 5", true), Prefix::Kill);
        assert_eq!(prefix(b"kill", false), Prefix::Unknown);
        assert_eq!(prefix(b"kill", true), Prefix::Kill);
        assert_eq!(prefix(b"ki", false), Prefix::Unknown);
        assert_eq!(prefix(b"killer", false), Prefix::Other);
        assert_eq!(prefix(b"  /* a comment", false), Prefix::Unknown);
        assert_eq!(prefix(b"  /", false), Prefix::Unknown);
        assert_eq!(prefix(b"  /", true), Prefix::Other);
        assert_eq!(prefix(b"--", false), Prefix::Unknown);
        assert_eq!(prefix(b"  /* a comment */ KILL 1", false), Prefix::Kill);
        assert_eq!(prefix(b"", false), Prefix::Unknown);
        assert_eq!(prefix(b"", true), Prefix::Other);
        let padded = format!("{}KILL 5", " ".repeat(PREFIX_LIMIT));
        assert_eq!(prefix(padded.as_bytes(), true), Prefix::Other);
        // Inside a versioned comment a lone `*` may start its `*/` (found by the command_watch
        // fuzz target: "/*!*" was taken for another statement, "/*!*/" is still undecided, so
        // `/*!*/KILL 5` cut after its fourth byte went through without its id rewritten).
        assert_eq!(prefix(b"/*!*", false), Prefix::Unknown);
        assert_eq!(prefix(b"/*!*/", false), Prefix::Unknown);
        assert_eq!(prefix(b"/*!*/KILL 5", false), Prefix::Kill);
        assert_eq!(prefix(b"/*!50000 *", false), Prefix::Unknown);
        assert_eq!(prefix(b"/*!50000 *x", false), Prefix::Other);
    }

    #[test]
    fn refusals_name_the_id() {
        let p = unknown_thread(3_000_000_001);
        assert_eq!(p[0], COM_QUERY);
        let text = String::from_utf8(p[1..].to_vec()).unwrap();
        assert!(text.starts_with("SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1094"));
        assert!(text.contains("Unknown thread id: 3000000001"));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300),
                                       complete in any::<bool>(), id in any::<u32>()) {
            let _ = prefix(&data, complete);
            let mut p = vec![COM_QUERY];
            p.extend_from_slice(&data);
            if let Some(k) = Kill::parse(&p) {
                let again = k.with_id(&p, id);
                if again.len() <= KILL_LIMIT {
                    prop_assert_eq!(Kill::parse(&again).map(|k| k.id), Some(u64::from(id)));
                }
            }
        }

        #[test]
        fn a_decision_stands_as_more_text_arrives(
            data in proptest::collection::vec(
                prop_oneof![Just(b'/'), Just(b'*'), Just(b'!'), Just(b'-'), Just(b' '),
                            Just(b'\n'), Just(b'#'), Just(b'k'), Just(b'i'), Just(b'l'),
                            Just(b'M'), Just(b'5'), any::<u8>()],
                0..40),
        ) {
            let mut decided = None;
            for end in 0..=data.len() {
                let p = prefix(&data[..end], false);
                if let Some(d) = decided {
                    prop_assert_eq!(p, d, "{:?}", String::from_utf8_lossy(&data[..end]));
                } else if p != Prefix::Unknown {
                    decided = Some(p);
                }
            }
            if let Some(d) = decided {
                prop_assert_eq!(prefix(&data, true), d);
            }
        }

        #[test]
        fn kill_words_in_any_case_and_spacing(id in any::<u32>(), hard in any::<bool>(),
                                              spaces in 1usize..4) {
            let sp = " ".repeat(spaces);
            let text = format!("kIlL{sp}{}QUERY{sp}{id}", if hard { "HARD " } else { "" });
            prop_assert_eq!(Kill::parse(&query(&text)).map(|k| k.id), Some(u64::from(id)));
        }
    }
}
