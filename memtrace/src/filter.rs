//! `--include` and `--exclude`: which tracebacks a report keeps, with the
//! semantics of tracemalloc's `Filter` and `Snapshot.filter_traces`. A
//! pattern is an fnmatch glob on file names (`*` also matches `/`); by
//! default it is matched against the innermost frame, where the allocation
//! was made, and with `--filter-all-frames` against every frame. A
//! traceback is kept if it matches at least one include pattern (when there
//! are any) and no exclude pattern. Totals are those of what is kept, as in
//! a filtered tracemalloc snapshot.

use anyhow::{Context as _, Result};
use glob::Pattern;

use crate::snapshot::Traceback;

#[derive(Clone, Debug, Default)]
pub struct Filters {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    all_frames: bool,
}

impl Filters {
    pub fn new(include: &[String], exclude: &[String], all_frames: bool) -> Result<Self> {
        let compile = |option: &str, globs: &[String]| {
            globs
                .iter()
                .map(|g| Pattern::new(g).with_context(|| format!("{option} {g:?} is not a valid glob")))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self { include: compile("--include", include)?, exclude: compile("--exclude", exclude)?, all_frames })
    }

    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    pub fn keeps(&self, traceback: &Traceback) -> bool {
        let matches = |pattern: &Pattern| match traceback.0.first() {
            _ if self.all_frames => traceback.0.iter().any(|f| pattern.matches(&f.filename)),
            Some(innermost) => pattern.matches(&innermost.filename),
            None => false,
        };
        (self.include.is_empty() || self.include.iter().any(matches)) && !self.exclude.iter().any(matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Frame;

    fn tb(files: &[&str]) -> Traceback {
        Traceback(files.iter().map(|f| Frame::at(*f, 1)).collect())
    }

    fn filters(include: &[&str], exclude: &[&str], all_frames: bool) -> Filters {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Filters::new(&own(include), &own(exclude), all_frames).unwrap()
    }

    /// The cases below give the same answers from tracemalloc's
    /// `Snapshot.filter_traces` on CPython 3.12.
    #[test]
    fn innermost_frame_by_default() {
        let app_calls_lib = tb(&["/usr/lib/python3.12/json/decoder.py", "/srv/app/main.py"]);
        let app = tb(&["/srv/app/main.py"]);
        let only_app = filters(&["/srv/app/*"], &[], false);
        assert!(only_app.keeps(&app));
        assert!(!only_app.keeps(&app_calls_lib), "only the innermost frame counts");
        let any_app = filters(&["/srv/app/*"], &[], true);
        assert!(any_app.keeps(&app_calls_lib));
        let no_stdlib = filters(&[], &["/usr/lib/python3.12/*"], false);
        assert!(!no_stdlib.keeps(&app_calls_lib) && no_stdlib.keeps(&app));
        // With all frames, an exclude pattern drops any traceback it touches.
        let no_app_anywhere = filters(&[], &["*/main.py"], true);
        assert!(!no_app_anywhere.keeps(&app_calls_lib));
        // Include and exclude together: in one include, out by an exclude.
        let both = filters(&["/srv/*", "*decoder.py"], &["*/main.py"], false);
        assert!(both.keeps(&app_calls_lib) && !both.keeps(&app));
        assert!(filters(&[], &[], false).keeps(&tb(&[])));
    }

    #[test]
    fn globs_are_fnmatch() {
        let f = filters(&["*.c", "x?.py", "[ab]*.py"], &[], false);
        for (file, kept) in [("/tmp/leak.c", true), ("x1.py", true), ("x12.py", false), ("b.py", true), ("c.py", false)]
        {
            assert_eq!(f.keeps(&tb(&[file])), kept, "{file}");
        }
        let err = Filters::new(&["[".into()], &[], false).unwrap_err();
        assert!(format!("{err:#}").starts_with("--include \"[\" is not a valid glob"), "{err:#}");
    }
}
