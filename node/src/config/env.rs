//! `OMESH_*` environment variables that omesh does not know. A misspelled one would be
//! ignored without a word and its setting silently not applied, so `omesh up` refuses a
//! variable that is a near miss of a known name, naming both; any other unknown `OMESH_*`
//! variable (a tool's or a test's of its own) is only warned about.

use std::ffi::OsString;

/// Variables omesh reads besides the keys of `omesh up` (clap declares those): the log
/// filter, the client commands', what a task finds in its environment, and the test suites'
/// switches (test peers inherit the suites' environment).
pub const OTHER_KNOWN: &[&str] = &[
    "OMESH_LOG",
    "OMESH_KEY",
    "OMESH_API",
    "OMESH_API_TOKEN",
    "OMESH_TASK_ID",
    "OMESH_EPOCH",
    "OMESH_REQUIRE_DOCKER",
    "OMESH_REQUIRE_CGROUPS",
    "OMESH_MULTIHOST_LOGS",
    "OMESH_BENCH_KEEP",
    "OMESH_TEST_VERBOSE",
];

/// An unknown `OMESH_*` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVar {
    /// Its name.
    pub name: String,
    /// The known name nearest to it.
    pub nearest: Option<String>,
    /// Whether it is near enough to be a misspelling of `nearest`.
    pub misspelled: bool,
}

impl std::fmt::Display for UnknownVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "environment variable {} is not one omesh knows",
            self.name
        )?;
        match (&self.nearest, self.misspelled) {
            (Some(n), true) => write!(f, "; did you mean {n}?"),
            (Some(n), false) => write!(f, " (the nearest known is {n})"),
            (None, _) => Ok(()),
        }
    }
}

/// The `OMESH_*` names in `vars` that are not in `known`, each with its nearest known name.
pub fn unknown(vars: impl IntoIterator<Item = OsString>, known: &[String]) -> Vec<UnknownVar> {
    let mut out = Vec::new();
    for var in vars {
        let Some(name) = var.to_str() else {
            continue;
        };
        if !name.starts_with("OMESH_") || known.iter().any(|k| k == name) {
            continue;
        }
        let nearest = known
            .iter()
            .map(|k| (distance(name, k), k))
            .min_by_key(|(d, _)| *d);
        let misspelled = nearest.is_some_and(|(d, k)| near_miss(name, k, d));
        out.push(UnknownVar {
            name: name.to_owned(),
            nearest: nearest.map(|(_, k)| k.clone()),
            misspelled,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A typo (a few edits, more for long names) or a known name cut short or run on
/// (`OMESH_THRESHOLD` for `OMESH_THRESHOLD_CPU`, `OMESH_SEED` for `OMESH_SEEDS`).
fn near_miss(name: &str, known: &str, edits: usize) -> bool {
    let tail = |s: &str| s.trim_start_matches("OMESH_").len();
    let allowed = (tail(known) / 5).max(2);
    edits <= allowed || (tail(name) >= 4 && (known.starts_with(name) || name.starts_with(known)))
}

/// Levenshtein distance over bytes (the names are ASCII).
fn distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn known() -> Vec<String> {
        [
            "OMESH_THRESHOLD_CPU",
            "OMESH_SEEDS",
            "OMESH_API_TOKEN",
            "OMESH_LOG",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    fn check(names: &[&str]) -> Vec<UnknownVar> {
        unknown(names.iter().map(OsString::from), &known())
    }

    #[test]
    fn known_and_foreign_names_pass() {
        assert!(check(&["OMESH_SEEDS", "OMESH_LOG", "PATH", "OMESHX"]).is_empty());
    }

    #[test]
    fn misspellings_name_the_known_variable() {
        for typo in [
            "OMESH_THRESHHOLD_CPU",
            "OMESH_TRESHOLD_CPU",
            "OMESH_THRESHOLD",
            "OMESH_SEED",
            "OMESH_API_TOKN",
        ] {
            let found = check(&[typo]);
            assert_eq!(found.len(), 1, "{typo}");
            assert!(found[0].misspelled, "{typo}: {found:?}");
            let text = found[0].to_string();
            assert!(text.contains(typo), "{text}");
            assert!(text.contains("did you mean OMESH_"), "{text}");
        }
    }

    #[test]
    fn a_name_far_from_every_known_one_is_not_called_a_misspelling() {
        let found = check(&["OMESH_SCREENSHOT_DIRECTORY"]);
        assert_eq!(found.len(), 1);
        assert!(!found[0].misspelled, "{found:?}");
    }

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}
