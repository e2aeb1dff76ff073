//! `multifd-bench local`: a local migration of the KVM test guest (its memfd handed over a
//! Unix socket, no page copied) beside a copy of the same guest over loopback TCP.
//!
//! One guest of `--size` RAM (the VMM's most is 3 GiB) makes one unpaced pass, writing
//! every page (so none is a zero page), and halts: an idle VM whose memory is all
//! populated. It then moves from VM to VM in this process, `--repeat` local hops and as
//! many TCP hops (`--channels` channels), alternating so that a slow spell of the host hits
//! both; each hop's destination is the next hop's source. Per hop, from the precopy
//! driver and [`KvmMigration::migrate`]:
//!
//! - **total**: from the start of the migration (the incoming VM's creation included) to
//!   the destination's VM running;
//! - **downtime**: from the source's stop to the destination's confirmation.
//!
//! The figures are the medians of each kind's hops.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use multifd::Address;
use multifd_cli::image::parse_size;
use multifd_cli::GIB;
use multifd_testvm::{GuestProgress, KvmMigration, KvmVm, VmConfig};

/// How long the guest's first pass (every page written) may take: generous for 3 GiB on
/// a loaded host.
const FIRST_PASS: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct LocalArgs {
    /// Guest memory (whole pages, at most 3G).
    #[arg(long, default_value = "3G", value_parser = parse_size)]
    size: u64,
    /// vCPUs, 1 to 4.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Channels of the TCP migration.
    #[arg(long, default_value_t = 4)]
    channels: u8,
    /// The frame buffer device's size (a multiple of 64 KiB): device state moves either
    /// way.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    frame_buffer: u64,
    /// Hops of each kind; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

/// One hop's figures.
#[derive(Debug, Clone, Copy)]
struct Hop {
    total: Duration,
    downtime: Duration,
    pages: u64,
}

pub fn run(args: &LocalArgs) -> Result<()> {
    let directory = tempfile::Builder::new()
        .prefix("multifd-local-bench")
        .tempdir()
        .context("cannot create the scratch directory")?;
    let mut config = VmConfig::new(args.size, args.vcpus);
    config.passes = 1;
    config.frame_buffer = args.frame_buffer;
    let mut vm = KvmVm::start(&config)?;
    let started = Instant::now();
    vm.wait_for_passes(&GuestProgress::default(), 1, FIRST_PASS)?;
    while !vm.halted_vcpus().iter().all(|&halted| halted) {
        ensure!(started.elapsed() < FIRST_PASS, "the guest did not halt");
        std::thread::sleep(Duration::from_millis(10));
    }
    check(&vm)?;
    let (mut local, mut tcp) = (Vec::new(), Vec::new());
    for run in 0..args.repeat {
        let socket = directory.path().join(format!("local-{run}.sock"));
        let mut migration = KvmMigration::new(format!("unix:{}", socket.display()).parse()?);
        migration.local = true;
        let (next, hop) = migrate(&vm, &migration)?;
        ensure!(
            hop.pages == 0,
            "the local migration sent {} pages",
            hop.pages
        );
        local.push(hop);
        vm = next;

        let mut migration = KvmMigration::new(free_tcp_address()?);
        migration.source.channels = args.channels;
        let (next, hop) = migrate(&vm, &migration)?;
        tcp.push(hop);
        vm = next;
    }
    print(args, &median(&local), &median(&tcp));
    Ok(())
}

/// One migration of `vm`; returns the VM it moved to.
fn migrate(vm: &KvmVm, migration: &KvmMigration) -> Result<(KvmVm, Hop)> {
    let (next, report) = migration.migrate(vm, &mut |_| {})?;
    check(&next)?;
    let sent = &report.precopy.migration;
    Ok((
        next,
        Hop {
            total: report.total_time,
            downtime: report.precopy.downtime,
            pages: sent.normal_pages + sent.zero_pages,
        },
    ))
}

/// The guest reported no error and no vCPU failed.
fn check(vm: &KvmVm) -> Result<()> {
    let progress = vm.progress();
    ensure!(
        progress.errors.is_empty() && vm.vcpu_failures().is_empty(),
        "the guest failed: {:?} {:?}",
        progress.errors,
        vm.vcpu_failures()
    );
    Ok(())
}

/// A loopback TCP address with a port that was free a moment ago.
fn free_tcp_address() -> Result<Address> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("tcp:127.0.0.1:{port}").parse()?)
}

/// The median of each figure of `hops` (at least one).
fn median(hops: &[Hop]) -> Hop {
    let middle = |figure: fn(&Hop) -> Duration| {
        let mut values: Vec<Duration> = hops.iter().map(figure).collect();
        values.sort();
        values[values.len() / 2]
    };
    let mut pages: Vec<u64> = hops.iter().map(|hop| hop.pages).collect();
    pages.sort();
    Hop {
        total: middle(|hop| hop.total),
        downtime: middle(|hop| hop.downtime),
        pages: pages[pages.len() / 2],
    }
}

fn print(args: &LocalArgs, local: &Hop, tcp: &Hop) {
    let milliseconds = |time: Duration| time.as_secs_f64() * 1e3;
    multifd_cli::outln!(
        "idle {:.2} GiB KVM guest ({} vCPUs, every page written), median of {} hops each",
        args.size as f64 / GIB,
        args.vcpus,
        args.repeat
    );
    multifd_cli::outln!(
        "{:<14} {:>10} {:>12} {:>10}",
        "",
        "total ms",
        "downtime ms",
        "RAM pages"
    );
    for (name, hop) in [
        ("local (memfd)".to_owned(), local),
        (format!("TCP, {} ch.", args.channels), tcp),
    ] {
        multifd_cli::outln!(
            "{:<14} {:>10.1} {:>12.1} {:>10}",
            name,
            milliseconds(hop.total),
            milliseconds(hop.downtime),
            hop.pages
        );
    }
    let ratio = |figure: fn(&Hop) -> Duration| {
        figure(tcp).as_secs_f64() / figure(local).as_secs_f64().max(1e-9)
    };
    multifd_cli::outln!(
        "{:<14} {:>9.0}× {:>11.0}×",
        "TCP / local",
        ratio(|hop| hop.total),
        ratio(|hop| hop.downtime)
    );
}
