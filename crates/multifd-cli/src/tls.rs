//! TLS on the command line: the `--tls-dir` and `--tls-hostname` options, and throwaway
//! certificates for the loopback benchmark and the tests.

use std::path::{Path, PathBuf};

use anyhow::Result;
use multifd::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// Mutual TLS 1.3 options of `send` and `recv`.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Mutual TLS 1.3 on every connection, with the certificates in DIR laid out as QEMU's:
    /// ca-cert.pem, plus server-cert.pem and server-key.pem for recv, client-cert.pem and
    /// client-key.pem for send.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name send expects in recv's certificate (default: the host of --to; needed
    /// with a unix: address). recv ignores it.
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_hostname: Option<String>,
}

impl TlsArgs {
    /// The engine's TLS settings, `None` without `--tls-dir`.
    pub fn config(&self) -> Option<TlsConfig> {
        self.tls_dir.as_ref().map(|dir| {
            let mut config = TlsConfig::new(dir);
            config.server_name.clone_from(&self.tls_hostname);
            config
        })
    }
}

/// Writes a fresh CA and a server and a client certificate it signed, valid for
/// `localhost` and 127.0.0.1, into `dir` in QEMU's layout. For benchmarks and tests only:
/// the keys are unprotected files.
pub fn generate_certificates(dir: &Path) -> Result<()> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "multifd throwaway CA");
    let authority = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca-cert.pem"), authority.pem())?;
    for role in ["server", "client"] {
        let key = KeyPair::generate()?;
        let certificate = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
            .signed_by(&key, &authority)?;
        std::fs::write(dir.join(format!("{role}-cert.pem")), certificate.pem())?;
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}
