//! What memtrace is doing while it starts, on a terminal. Planning probes
//! in a large interpreter, loading the programs, the first census of a big
//! heap and reading symbols for the first report can each take seconds,
//! and a silent terminal looks hung; a spinner on stderr names the step,
//! and is cleared before anything else is printed, so it never mixes with
//! reports or messages. On a pipe or a file (logs, tests, `2>err`) there is
//! no spinner at all: stderr stays one clean line per message. Nor with
//! `--verbose`, whose lines would scroll it away.

use std::{borrow::Cow, io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A spinner if stderr is a terminal and `quiet` is false; else nothing.
    pub fn start(quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} memtrace: {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    /// Names the step memtrace is at now.
    pub fn step(&self, what: impl Into<Cow<'static, str>>) {
        if let Some(bar) = &self.0 {
            bar.set_message(what);
        }
    }

    /// Prints a message line above the spinner.
    pub fn say(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Clears the spinner for good: what follows is printed as usual.
    pub fn clear(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}
