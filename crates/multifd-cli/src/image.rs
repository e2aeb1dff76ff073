//! Memory images for the demo and the benchmark: a deterministic mix of zero pages (25%),
//! random pages (25%) and text-like pages (50%), interleaved page by page.

use std::fs::OpenOptions;
use std::path::Path;

use anyhow::{Context, Result};
use memmap2::MmapMut;

/// Page granularity of the mix.
pub const PAGE: usize = 4096;

/// Words text-like pages are made of: compressible, but not trivially.
const WORDS: &[&[u8]] = &[
    b"the ",
    b"guest ",
    b"memory ",
    b"page ",
    b"is ",
    b"dirty ",
    b"and ",
    b"sent ",
    b"over ",
    b"channel ",
    b"sync ",
    b"round ",
    b"kernel: ",
    b"device ",
    b"state ",
    b"0x7f3a ",
    b"error ",
    b"return ",
    b"struct ",
    b"buffer ",
    b"{ ",
    b"} ",
    b"= ",
    b"; ",
    b"\n",
    b"\t",
    b"migration ",
    b"virtio-net ",
    b"queue ",
    b"interrupt ",
    b"timer ",
    b"INFO ",
];

/// splitmix64: a fast, well-mixed stream from any seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        value ^ (value >> 31)
    }
}

/// The kind of page `index` holds in an image with this seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zero: sent as an offset only.
    Zero,
    /// Random bytes: incompressible.
    Random,
    /// Text-like bytes: compressible.
    Text,
}

/// The kind of page `index` of an image generated from `seed`.
pub fn page_kind(seed: u64, index: u64) -> PageKind {
    match Random(seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d)).next() % 4 {
        0 => PageKind::Zero,
        1 => PageKind::Random,
        _ => PageKind::Text,
    }
}

/// Fills `bytes` (a whole number of pages) with the mix.
pub fn fill(bytes: &mut [u8], seed: u64) {
    let mut random = Random(seed);
    for (index, page) in bytes.chunks_mut(PAGE).enumerate() {
        match page_kind(seed, index as u64) {
            PageKind::Zero => page.fill(0),
            PageKind::Random => {
                for word in page.chunks_mut(8) {
                    word.copy_from_slice(&random.next().to_le_bytes()[..word.len()]);
                }
            }
            PageKind::Text => {
                let mut position = 0;
                let mut choices = 0u64;
                while position < page.len() {
                    if choices < 32 {
                        choices = random.next() | (1 << 63);
                    }
                    let word = WORDS[(choices % WORDS.len() as u64) as usize];
                    choices /= WORDS.len() as u64;
                    let length = word.len().min(page.len() - position);
                    page[position..position + length].copy_from_slice(&word[..length]);
                    position += length;
                }
            }
        }
    }
}

/// Creates `path` as an image of `size` bytes (a multiple of the page size).
pub fn create(path: &Path, size: u64, seed: u64) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("cannot size {}", path.display()))?;
    // SAFETY: the file was just created by this process and nothing else maps or writes
    // it while the mapping lives.
    let mut mapping = unsafe { MmapMut::map_mut(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    fill(&mut mapping, seed);
    mapping.flush_async().context("flushing the image")?;
    Ok(())
}

/// A fresh directory for big temporary images, removed when dropped: in `dir` if given,
/// else in /dev/shm when present (memory-backed, so disk speed is not what gets
/// measured), else in the temp dir.
pub fn scratch_directory(dir: Option<&Path>, prefix: &str) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let base = match dir {
        Some(dir) => dir.to_path_buf(),
        None if shm.is_dir() => shm.to_path_buf(),
        None => std::env::temp_dir(),
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))
}

/// Parses sizes like `4G`, `512M`, `64K` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text
        .char_indices()
        .find(|(_, character)| !character.is_ascii_digit())
    {
        Some((position, _)) => text.split_at(position),
        None => (text, ""),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
    };
    let size = value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if size == 0 || size % PAGE as u64 != 0 {
        return Err(format!(
            "{text:?} must be a positive multiple of {PAGE} bytes"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_has_every_kind_in_about_the_right_share() {
        let mut bytes = vec![0xffu8; 1024 * PAGE];
        fill(&mut bytes, 7);
        let zero = bytes
            .chunks(PAGE)
            .filter(|page| page.iter().all(|&byte| byte == 0))
            .count();
        let text = bytes
            .chunks(PAGE)
            .filter(|page| {
                page.iter().all(|byte| byte.is_ascii()) && page.iter().any(|&byte| byte != 0)
            })
            .count();
        assert!((200..312).contains(&zero), "zero pages: {zero}");
        assert!((440..584).contains(&text), "text pages: {text}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("3T").is_err());
        assert!(parse_size("").is_err());
    }
}
