//! Standard output that a closed pipe cannot crash. `multifd ... | head`, or a reader that
//! went away, gets what it read; the migration's outcome stays the exit code, and the
//! process neither panics (Rust's `println!` does on `EPIPE`) nor dies of `SIGPIPE`.

use std::fmt;
use std::io::{self, Write};

/// Writes `text` to standard output; a reader that is gone is not an error of ours.
pub fn write(text: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if error.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("multifd: cannot write the output: {error}");
        }
    }
}

/// `println!` through [`write`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`write`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}
