//! `IDSTR[/INSTANCE]=PATH` arguments: files that stand for a device's state.
//!
//! The source sends a file as a device's state: every byte but the last 4 KiB as the state
//! stream, the last 4 KiB (the whole file when it is smaller) as the config blob. The
//! destination writes the state and then the config to its file, so the received file
//! equals the sent one byte for byte.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result};
use multifd::{
    DeviceError, DeviceId, LoadDevice, LoadDevices, SaveDevice, SaveDevices, StateWriter,
};
use multifd_cli::outputs::{self, Outputs};
use multifd_cli::ram_files::RamFile;

/// How much of the end of a device file is its config blob.
pub const CONFIG_BLOB_LEN: u64 = 4096;

/// How much of a device file is read at a time while saving: large enough that reads are
/// few, small next to the state of a device worth migrating this way.
const READ_SIZE: usize = 1 << 20;

/// One `--device IDSTR[/INSTANCE]=PATH` argument.
#[derive(Debug, Clone)]
pub struct DeviceFile {
    pub id: DeviceId,
    pub path: PathBuf,
}

impl FromStr for DeviceFile {
    type Err = String;

    /// The instance is the part after the last `/` when it is a number (QEMU idstrs
    /// contain slashes, e.g. `0000:00:02.0/vfio`), 0 otherwise.
    fn from_str(text: &str) -> Result<Self, String> {
        let Some((device, path)) = text.split_once('=') else {
            return Err(format!("{text:?} is not IDSTR[/INSTANCE]=PATH"));
        };
        let (idstr, instance_id) = match device.rsplit_once('/') {
            Some((idstr, instance)) if !instance.is_empty() => match instance.parse::<u32>() {
                Ok(instance_id) => (idstr, instance_id),
                Err(_) => (device, 0),
            },
            _ => (device, 0),
        };
        if idstr.is_empty() || path.is_empty() {
            return Err(format!("{text:?} is not IDSTR[/INSTANCE]=PATH"));
        }
        Ok(Self {
            id: DeviceId::new(idstr, instance_id),
            path: path.into(),
        })
    }
}

/// Sends a file as a device's state and config.
struct FileSave {
    file: File,
    /// Bytes before the config blob.
    state_len: u64,
}

impl SaveDevice for FileSave {
    fn save_state(&mut self, state: &mut StateWriter<'_>) -> Result<(), DeviceError> {
        let mut buffer = vec![0u8; READ_SIZE];
        let mut left = self.state_len;
        self.file.seek(SeekFrom::Start(0))?;
        while left > 0 {
            let want = left.min(READ_SIZE as u64) as usize;
            self.file.read_exact(&mut buffer[..want])?;
            state.write_all(&buffer[..want])?;
            left -= want as u64;
        }
        Ok(())
    }

    fn save_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        let mut config = Vec::new();
        self.file.seek(SeekFrom::Start(self.state_len))?;
        self.file.read_to_end(&mut config)?;
        Ok(config)
    }
}

/// Writes a device's loaded state, then its config, to a file.
struct FileLoad {
    file: BufWriter<File>,
}

impl LoadDevice for FileLoad {
    fn load_state(&mut self, chunk: &[u8]) -> Result<(), DeviceError> {
        self.file.write_all(chunk)?;
        Ok(())
    }

    fn load_config(&mut self, config: &[u8]) -> Result<(), DeviceError> {
        self.file.write_all(config)?;
        self.file.flush()?;
        Ok(())
    }
}

/// Opens each file as the device it names, for sending.
pub fn open_for_sending(files: &[DeviceFile]) -> Result<SaveDevices> {
    files
        .iter()
        .map(|device| {
            let file = File::open(&device.path)
                .with_context(|| format!("cannot open {}", device.path.display()))?;
            let length = file
                .metadata()
                .with_context(|| format!("cannot stat {}", device.path.display()))?
                .len();
            let save = FileSave {
                file,
                state_len: length.saturating_sub(CONFIG_BLOB_LEN),
            };
            Ok((device.id.clone(), Box::new(save) as Box<dyn SaveDevice>))
        })
        .collect()
}

/// Refuses, before anything listens or is written, `--ram` and `--device` outputs that
/// would collide or could not be written (see [`outputs::check`]).
pub fn check_outputs(ram: &[RamFile], devices: &[DeviceFile]) -> Result<()> {
    let ram = ram.iter().map(|file| outputs::Output {
        flag: "--ram",
        name: &file.name,
        path: &file.path,
    });
    let ids: Vec<String> = devices.iter().map(|device| device.id.to_string()).collect();
    let devices = devices
        .iter()
        .zip(&ids)
        .map(|(device, id)| outputs::Output {
            flag: "--device",
            name: id,
            path: &device.path,
        });
    outputs::check(&ram.chain(devices).collect::<Vec<_>>())
}

/// Creates a new file (in `outputs`, renamed into place on success) for each device, for
/// receiving.
pub fn create_for_receiving(files: &[DeviceFile], outputs: &Outputs) -> Result<LoadDevices> {
    files
        .iter()
        .map(|device| {
            let file = outputs.create(&device.path)?;
            let load = FileLoad {
                file: BufWriter::new(file),
            };
            Ok((device.id.clone(), Box::new(load) as Box<dyn LoadDevice>))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_idstr_instance_and_path() {
        let parse = |text: &str| DeviceFile::from_str(text).map(|file| (file.id, file.path));
        assert_eq!(
            parse("0000:00:02.0/vfio/3=/tmp/a"),
            Ok((DeviceId::new("0000:00:02.0/vfio", 3), "/tmp/a".into()))
        );
        assert_eq!(
            parse("0000:00:02.0/vfio=/tmp/a"),
            Ok((DeviceId::new("0000:00:02.0/vfio", 0), "/tmp/a".into()))
        );
        assert_eq!(
            parse("net0=b=c"),
            Ok((DeviceId::new("net0", 0), "b=c".into()))
        );
        assert!(parse("net0").is_err());
        assert!(parse("=/tmp/a").is_err());
        assert!(parse("net0=").is_err());
    }
}
