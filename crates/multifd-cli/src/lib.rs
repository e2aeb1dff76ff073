//! What the `multifd` binary shares with the `multifd-bench` binary: generated memory
//! images, memory-image files, a process's CPU time, and the steps of `multifd bench`,
//! which `multifd-bench` runs beside its baselines. Application code shared by two
//! binaries, not an API: its errors are `anyhow` ones, as theirs are.

pub mod bench;
pub mod cpu_time;
pub mod image;
pub mod output;
pub mod outputs;
pub mod ram_files;
pub mod shrink_guard;
pub mod tls;

use clap::ValueEnum;
use multifd::Compression;

/// Bytes in a GiB, the unit sizes and rates are printed in.
pub const GIB: f64 = (1u64 << 30) as f64;

/// A page compression method, as the command line names it.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// No compression.
    None,
    /// zlib (QEMU's format).
    Zlib,
    /// zstd (QEMU's format).
    Zstd,
    /// lz4 (this project's extension).
    Lz4,
}

impl From<Method> for Compression {
    fn from(method: Method) -> Self {
        match method {
            Method::None => Self::None,
            Method::Zlib => Self::Zlib,
            Method::Zstd => Self::Zstd,
            Method::Lz4 => Self::Lz4,
        }
    }
}
