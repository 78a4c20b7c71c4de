//! Long simulation campaigns: `cargo run --release --example simulate -- --seeds N`.
//!
//! Runs seeds `start..start+N` (or one `--seed S`, with its trace), prints the
//! trace of the first failing seed and every failing seed's broken invariants
//! with the command that reruns it, and ends with one line:
//! `seeds: N, steps: …, faults: …, violations: V`. Exits 1 when anything broke.
//! With `--features mutations`, `--plant NAME` plants a known mistake in the
//! protocol code first (the run must then fail).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern::protocol::mutations::Mutation;
use tern::simulation::{Report, run_seed_with};

struct Args {
    seeds: u64,
    start: u64,
    seed: Option<u64>,
    plant: Option<Mutation>,
    threads: usize,
    trace: bool,
}

fn usage() -> String {
    let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
    format!(
        "usage: simulate [--seeds N] [--start S] [--seed S] [--trace] [--threads T] [--plant NAME]\n\
         mistakes that can be planted (needs --features mutations): {}",
        names.join(", ")
    )
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        seeds: 1000,
        start: 0,
        seed: None,
        plant: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        trace: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |v: String, name: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--seeds" => args.seeds = number(value("--seeds")?, "--seeds")?,
            "--start" => args.start = number(value("--start")?, "--start")?,
            "--seed" => args.seed = Some(number(value("--seed")?, "--seed")?),
            "--threads" => args.threads = number(value("--threads")?, "--threads")?.max(1) as usize,
            "--trace" => args.trace = true,
            "--plant" => {
                let name = value("--plant")?;
                let m =
                    Mutation::parse(&name).ok_or_else(|| format!("no mistake named {name:?}"))?;
                args.plant = Some(m);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn print_failure(report: &Report, plant: Option<Mutation>) {
    println!(
        "seed {} broke {} invariant(s):",
        report.seed,
        report.violations.len()
    );
    for v in &report.violations {
        println!("  {v}");
    }
    let plant = plant.map(|m| {
        format!(
            " --features mutations --example simulate -- --plant {}",
            m.name()
        )
    });
    match plant {
        Some(p) => println!("  rerun: cargo run --release{p} --seed {}", report.seed),
        None => println!(
            "  rerun: cargo run --release --example simulate -- --seed {}",
            report.seed
        ),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("simulate: {e}");
            }
            eprintln!("{}", usage());
            return ExitCode::from(if e.is_empty() { 0 } else { 64 });
        }
    };
    if args.plant.is_some() && !cfg!(feature = "mutations") {
        eprintln!("simulate: --plant needs a build with --features mutations");
        return ExitCode::from(64);
    }
    if let Some(seed) = args.seed {
        let report =
            run_seed_with(seed, true, args.plant).expect("planted when built with mutations");
        if args.trace || !report.ok() {
            for line in &report.trace {
                println!("{line}");
            }
        }
        if !report.ok() {
            print_failure(&report, args.plant);
        }
        println!(
            "seeds: 1, steps: {}, faults: {}, violations: {}",
            report.steps,
            report.faults,
            report.violations.len()
        );
        return if report.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    let next = Arc::new(AtomicU64::new(args.start));
    let end = args.start + args.seeds;
    let totals = Arc::new(Mutex::new((0u64, 0u64, 0u64, Vec::<Report>::new())));
    let kinds = Arc::new(Mutex::new(
        std::collections::BTreeMap::<&'static str, u64>::new(),
    ));
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.threads {
            let (next, totals, kinds) = (next.clone(), totals.clone(), kinds.clone());
            scope.spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        return;
                    }
                    let report = run_seed_with(seed, false, args.plant).expect("planted");
                    {
                        let mut k = kinds.lock().expect("kinds");
                        for kind in &report.fault_kinds {
                            *k.entry(kind).or_insert(0) += 1;
                        }
                        if report.evacuations > 0 {
                            *k.entry("(evacuations)").or_insert(0) += 1;
                        }
                        if report.recoveries > 0 {
                            *k.entry("(post-copy recovered)").or_insert(0) += 1;
                        }
                    }
                    let mut t = totals.lock().expect("totals");
                    t.0 += 1;
                    t.1 += report.steps;
                    t.2 += report.faults;
                    if !report.ok() {
                        t.3.push(report);
                    }
                }
            });
        }
    });
    let (seeds, steps, faults, mut failed) = Arc::try_unwrap(totals)
        .expect("threads done")
        .into_inner()
        .expect("totals");
    failed.sort_by_key(|r| r.seed);
    // The first failing seed with its whole trace, the rest in a line each.
    if let Some(first) = failed.first() {
        let traced = run_seed_with(first.seed, true, args.plant).expect("planted");
        for line in &traced.trace {
            println!("{line}");
        }
    }
    for report in failed.iter().take(20) {
        print_failure(report, args.plant);
    }
    if failed.len() > 20 {
        println!("... and {} more failing seeds", failed.len() - 20);
    }
    let violations: usize = failed.iter().map(|r| r.violations.len()).sum();
    eprintln!("({:.1} s)", started.elapsed().as_secs_f64());
    println!("seeds that include each kind of fault:");
    for (kind, n) in kinds.lock().expect("kinds").iter() {
        println!("  {kind}: {n}");
    }
    println!("seeds: {seeds}, steps: {steps}, faults: {faults}, violations: {violations}");
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
