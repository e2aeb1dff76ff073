//! Mutual TLS 1.3: a migration over TLS arrives byte for byte, and every mismatch (wrong
//! CA, no client certificate, an expired certificate, a wrong server name, TLS on one
//! end only) is a clear error on both ends within the setup deadline.

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;
use multifd::{
    Compression, CompressionSettings, Error, GuestMemory, Side, Source, SourceConfig, TlsConfig,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

type Authority = CertifiedIssuer<'static, KeyPair>;

fn authority(name: &str) -> Authority {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// A certificate for `localhost` and 127.0.0.1 signed by `authority`; expired if asked.
fn leaf(authority: &Authority, expired: bool) -> (String, String) {
    let mut params =
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("leaf params");
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().expect("leaf key");
    let certificate = params.signed_by(&key, authority).expect("leaf");
    (certificate.pem(), key.serialize_pem())
}

/// Writes a certificate directory in QEMU's layout: the CA, and the `role`'s pair.
fn write(dir: &Path, authority: &Authority, role: &str, (certificate, key): &(String, String)) {
    std::fs::write(dir.join("ca-cert.pem"), authority.pem()).expect("write CA");
    std::fs::write(dir.join(format!("{role}-cert.pem")), certificate).expect("write cert");
    std::fs::write(dir.join(format!("{role}-key.pem")), key).expect("write key");
}

/// Certificate directories for a destination and a source.
struct Dirs {
    destination: tempfile::TempDir,
    source: tempfile::TempDir,
}

/// Both ends' certificates from one CA, optionally with an expired server certificate.
fn dirs(expired_server: bool) -> Dirs {
    let ca = authority("multifd test CA");
    let dirs = Dirs {
        destination: tempfile::tempdir().expect("tempdir"),
        source: tempfile::tempdir().expect("tempdir"),
    };
    write(
        dirs.destination.path(),
        &ca,
        "server",
        &leaf(&ca, expired_server),
    );
    write(dirs.source.path(), &ca, "client", &leaf(&ca, false));
    dirs
}

fn memory() -> GuestMemory {
    let memory = GuestMemory::new(vec![block("pc.ram", 4 << 20)]).expect("memory");
    fill_mixed(&memory.blocks()[0], 7);
    memory
}

/// Runs one migration of `memory` with the given TLS settings on each end.
fn migrate(
    memory: &GuestMemory,
    source_tls: Option<TlsConfig>,
    destination_tls: Option<TlsConfig>,
) -> (Result<(), Error>, Result<(), Error>) {
    let zstd = CompressionSettings::new(Compression::Zstd, None).expect("zstd");
    let copy = empty_like(memory);
    let (listener, address) = listener(false);
    let mut destination_config = quick_destination_config();
    // A connection whose handshake fails is a stray the destination drops while it waits
    // on for a source; the wait then ends with the stray's error.
    destination_config.wait_for_source = Some(STRAY_WAIT);
    destination_config.tls = destination_tls;
    let destination = spawn_destination(listener, destination_config, copy.clone());
    let mut config = SourceConfig::default();
    config.channels = 4;
    config.compression = zstd;
    config.connect_timeout = DEADLINE;
    config.tls = source_tls;
    let source = Source::connect(&address, &config, memory.clone()).and_then(|mut source| {
        source.queue_block(0)?;
        source.end_round()?;
        source.complete().map(drop)
    });
    let destination = join_within(destination, DEADLINE * 2).map(drop);
    if source.is_ok() && destination.is_ok() {
        assert!(
            bytes(&memory.blocks()[0]) == bytes(&copy.blocks()[0]),
            "copy differs"
        );
    }
    (source, destination)
}

/// How long a destination in these tests waits for a source whose handshake may fail.
const STRAY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Asserts both ends failed with [`Error::Tls`] within the setup deadline (the destination
/// once its wait for a source ended, with the failed connection as the last stray), each
/// message saying one of `source_says` and `destination_says`.
fn assert_tls_failure(
    started: Instant,
    (source, destination): (Result<(), Error>, Result<(), Error>),
    source_says: &[&str],
    destination_says: &[&str],
) {
    assert!(started.elapsed() < DEADLINE, "took {:?}", started.elapsed());
    let destination = destination.map_err(|error| match error {
        Error::TimeoutWithStrays {
            side: Side::Destination,
            strays: 1,
            last,
            ..
        } => *last,
        other => other,
    });
    for (result, side, says) in [
        (source, Side::Source, source_says),
        (destination, Side::Destination, destination_says),
    ] {
        match result {
            Err(error @ Error::Tls { side: at, .. }) if at == side => {
                let message = error.to_string();
                assert!(
                    says.iter().any(|said| message.contains(said)),
                    "{side}: {message}"
                );
            }
            other => panic!("{side}: expected a TLS error, got {other:?}"),
        }
    }
}

/// What a destination may report when the source refused its certificate: rustls' alert,
/// or, when the source closed before the alert was read, the closed handshake.
const REFUSED: &str = "refused this side's certificate";

/// What a plaintext end reports about a TLS peer.
const PLAINTEXT_END: &str = "it uses TLS and this side does not";

#[test]
fn migration_over_tls_is_byte_exact_with_four_channels_and_zstd() {
    let dirs = dirs(false);
    let (source, destination) = migrate(
        &memory(),
        Some(TlsConfig::new(dirs.source.path())),
        Some(TlsConfig::new(dirs.destination.path())),
    );
    source.expect("source");
    destination.expect("destination");
}

#[test]
fn wrong_ca_fails_on_both_ends() {
    let dirs = dirs(false);
    // The source trusts, and is signed by, another CA.
    let other = authority("another CA");
    write(dirs.source.path(), &other, "client", &leaf(&other, false));
    let started = Instant::now();
    let outcome = migrate(
        &memory(),
        Some(TlsConfig::new(dirs.source.path())),
        Some(TlsConfig::new(dirs.destination.path())),
    );
    assert_tls_failure(
        started,
        outcome,
        &["UnknownIssuer"],
        &["UnknownCA", REFUSED],
    );
}

#[test]
fn missing_client_certificate_fails_on_both_ends() {
    let dirs = dirs(false);
    let mut source_tls = TlsConfig::new(dirs.source.path());
    source_tls.mutual = false;
    let started = Instant::now();
    let outcome = migrate(
        &memory(),
        Some(source_tls),
        Some(TlsConfig::new(dirs.destination.path())),
    );
    assert_tls_failure(
        started,
        outcome,
        &["CertificateRequired"],
        &["no certificates"],
    );
}

#[test]
fn expired_certificate_fails_on_both_ends() {
    let dirs = dirs(true);
    let started = Instant::now();
    let outcome = migrate(
        &memory(),
        Some(TlsConfig::new(dirs.source.path())),
        Some(TlsConfig::new(dirs.destination.path())),
    );
    assert_tls_failure(
        started,
        outcome,
        &["certificate expired"],
        &["CertificateExpired", REFUSED],
    );
}

#[test]
fn wrong_server_name_fails_on_both_ends() {
    let dirs = dirs(false);
    let mut source_tls = TlsConfig::new(dirs.source.path());
    source_tls.server_name = Some("elsewhere.example".into());
    let started = Instant::now();
    let outcome = migrate(
        &memory(),
        Some(source_tls),
        Some(TlsConfig::new(dirs.destination.path())),
    );
    assert_tls_failure(
        started,
        outcome,
        &["not valid for name"],
        &["BadCertificate", REFUSED],
    );
}

#[test]
fn tls_source_to_plaintext_destination_fails_on_both_ends() {
    let dirs = dirs(false);
    let started = Instant::now();
    let outcome = migrate(&memory(), Some(TlsConfig::new(dirs.source.path())), None);
    assert_tls_failure(started, outcome, &["may not use TLS"], &[PLAINTEXT_END]);
}

#[test]
fn plaintext_source_to_tls_destination_fails_on_both_ends() {
    let dirs = dirs(false);
    let started = Instant::now();
    let outcome = migrate(
        &memory(),
        None,
        Some(TlsConfig::new(dirs.destination.path())),
    );
    assert_tls_failure(started, outcome, &[PLAINTEXT_END], &["not speaking TLS"]);
}

#[test]
fn missing_certificate_file_is_named() {
    let dirs = dirs(false);
    std::fs::remove_file(dirs.source.path().join("client-key.pem")).expect("remove key");
    let mut config = SourceConfig::default();
    config.tls = Some(TlsConfig::new(dirs.source.path()));
    let address = "tcp:127.0.0.1:1".parse().expect("address");
    match Source::connect(&address, &config, memory()) {
        Err(Error::TlsFile { path, .. }) => assert!(path.ends_with("client-key.pem")),
        Err(other) => panic!("expected TlsFile, got {other}"),
        Ok(_) => panic!("connected without a key"),
    }
}

#[test]
fn a_silent_connection_to_a_tls_destination_is_dropped_and_the_source_gets_through() {
    let dirs = dirs(false);
    let memory = memory();
    let copy = empty_like(&memory);
    let (listener, address) = listener(false);
    let mut config = quick_destination_config();
    config.connect_timeout = std::time::Duration::from_millis(500);
    config.tls = Some(TlsConfig::new(dirs.destination.path()));
    let destination = spawn_destination(listener, config, copy.clone());
    let _silent = tcp_connect(&address);
    // Past the silent connection's setup deadline: it has been dropped as a stray.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut source_config = SourceConfig::default();
    source_config.tls = Some(TlsConfig::new(dirs.source.path()));
    let mut source = Source::connect(&address, &source_config, memory.clone()).expect("source");
    source.queue_block(0).expect("queue");
    source.end_round().expect("round");
    source.complete().expect("complete");
    let stats = join_within(destination, DEADLINE).expect("destination");
    assert_eq!(stats.stray_connections, 1);
    assert!(bytes(&memory.blocks()[0]) == bytes(&copy.blocks()[0]));
}

#[test]
fn a_bad_pem_file_is_named() {
    let dirs = dirs(false);
    let key = dirs.destination.path().join("server-key.pem");
    std::fs::write(&key, "not a key\n").expect("overwrite key");
    let (listener, _) = listener(false);
    let mut config = quick_destination_config();
    config.tls = Some(TlsConfig::new(dirs.destination.path()));
    match join_within(spawn_destination(listener, config, memory()), DEADLINE) {
        Err(error @ Error::TlsPem { .. }) => {
            assert!(error.to_string().contains("server-key.pem"), "{error}");
        }
        other => panic!("expected TlsPem, got {other:?}"),
    }
}
