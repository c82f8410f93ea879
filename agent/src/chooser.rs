//! The interactive chooser of `connect`, as the old `cf tunnel` had: run on a terminal without
//! `--exec` for a MySQL service, `connect` asks which client to start against the local port.
//!
//! ```text
//! 1: none
//! 2: mariadb
//! 3: mysqldump
//! Which client would you like to start?: 3
//! Output file: orders.sql
//! ```
//!
//! "none" keeps the port open and prints the connection details; the others start the client
//! through [`crate::exec`] with the binding's user and database (the password goes in
//! `MYSQL_PWD`), and `connect` exits with the client's status. mysqldump's output goes to the
//! file. The dialogue is a pure function of its input and output streams, so it is tested
//! without a terminal; the end-to-end test drives it through a pseudo-terminal.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;

/// The clients offered, in menu order.
const MENU: &[&str] = &["none", "mariadb", "mysqldump"];

/// What the user chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Keep the port open; start nothing.
    None,
    /// The `mariadb` client.
    Mariadb,
    /// `mysqldump` into this file.
    Mysqldump(PathBuf),
}

/// Asks on `out` and reads the answer from `input`, until a valid one (or the end of the input,
/// which means "none").
pub fn ask(input: &mut impl BufRead, out: &mut impl Write) -> io::Result<Choice> {
    for (i, name) in MENU.iter().enumerate() {
        writeln!(out, "{}: {name}", i + 1)?;
    }
    let choice = loop {
        write!(out, "Which client would you like to start?: ")?;
        out.flush()?;
        let Some(line) = read_line(input)? else {
            return Ok(Choice::None);
        };
        let line = line.trim();
        let picked = match line.parse::<usize>() {
            Ok(n) if (1..=MENU.len()).contains(&n) => Some(MENU[n - 1]),
            _ => MENU.iter().copied().find(|m| m.eq_ignore_ascii_case(line)),
        };
        match picked {
            Some(name) => break name,
            None => writeln!(out, "Please choose 1 to {}.", MENU.len())?,
        }
    };
    Ok(match choice {
        "mariadb" => Choice::Mariadb,
        "mysqldump" => loop {
            write!(out, "Output file: ")?;
            out.flush()?;
            let Some(line) = read_line(input)? else {
                return Ok(Choice::None);
            };
            let file = line.trim();
            if !file.is_empty() {
                break Choice::Mysqldump(PathBuf::from(file));
            }
        },
        _ => Choice::None,
    })
}

/// The program and arguments for `choice` with `database` (empty: none known), or `None` for
/// [`Choice::None`].
pub fn command(choice: &Choice, database: &str) -> Option<(&'static str, Vec<String>)> {
    match choice {
        Choice::None => None,
        Choice::Mariadb => Some((
            "mariadb",
            (!database.is_empty())
                .then(|| database.to_owned())
                .into_iter()
                .collect(),
        )),
        Choice::Mysqldump(_) => {
            let mut args = vec!["--single-transaction".to_owned()];
            if database.is_empty() {
                args.push("--all-databases".into());
            } else {
                args.push(database.to_owned());
            }
            Some(("mysqldump", args))
        }
    }
}

/// A line of input without its end, or `None` at the end of the input.
fn read_line(input: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str) -> (Choice, String) {
        let mut out = Vec::new();
        let choice = ask(&mut input.as_bytes(), &mut out).unwrap();
        (choice, String::from_utf8(out).unwrap())
    }

    #[test]
    fn menu_numbers_and_names() {
        let (c, out) = run("1\n");
        assert_eq!(c, Choice::None);
        assert!(
            out.starts_with("1: none\n2: mariadb\n3: mysqldump\nWhich client"),
            "{out}"
        );
        assert_eq!(run("2\n").0, Choice::Mariadb);
        assert_eq!(run("MariaDB\r\n").0, Choice::Mariadb);
        assert_eq!(
            run("3\n\n  dump.sql \n").0,
            Choice::Mysqldump("dump.sql".into())
        );
    }

    #[test]
    fn asks_again_and_ends_at_eof() {
        let (c, out) = run("9\nmysql\n2\n");
        assert_eq!(c, Choice::Mariadb);
        assert_eq!(out.matches("Please choose 1 to 3.").count(), 2, "{out}");
        assert_eq!(run("").0, Choice::None);
        assert_eq!(run("3\n").0, Choice::None);
    }

    #[test]
    fn commands_carry_the_database() {
        assert_eq!(command(&Choice::None, "db"), None);
        assert_eq!(
            command(&Choice::Mariadb, "appdb"),
            Some(("mariadb", vec!["appdb".to_owned()]))
        );
        assert_eq!(command(&Choice::Mariadb, ""), Some(("mariadb", vec![])));
        assert_eq!(
            command(&Choice::Mysqldump("f".into()), ""),
            Some((
                "mysqldump",
                vec!["--single-transaction".into(), "--all-databases".into()]
            ))
        );
    }
}
