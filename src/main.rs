use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use millracer::app::cli::{Cli, Command};
use millracer::app::{events, operator, ops, run, telemetry, worker};
use millracer::bus::broker::Incompatible;

fn main() -> ExitCode {
    // The reference prints its help on stdout and exits 2 when no subcommand is given.
    if std::env::args_os().len() <= 1 {
        let _ = Cli::command().print_help();
        println!();
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("millracer: error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    // Telemetry starts inside the runtime (the gRPC exporter needs it) and is dropped
    // last, so spans still buffered are flushed before the process exits.
    let telemetry = |level: &str, service: &str| {
        let _enter = runtime.enter();
        telemetry::init(cli.log_format, level, service)
    };
    let code = match cli.command {
        Command::Worker(args) => {
            let telemetry = telemetry("info", "millracer-worker");
            let code = worker_exit_code(runtime.block_on(worker::run(args)));
            drop(telemetry);
            // The stop is bounded (`--shutdown-timeout`): nothing left behind (a runtime
            // command's blocking thread) may hold the process open after it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(500));
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Command::Ops(args) => {
            let _telemetry = telemetry("warn", "millracer-ops");
            runtime.block_on(ops::run(args))
        }
        Command::Events(args) => {
            let _telemetry = telemetry("warn", "millracer-events");
            exit_code(runtime.block_on(events::run(args)))
        }
        Command::Run(args) => {
            let _telemetry = telemetry("warn", "millracer-run");
            runtime.block_on(run::run(args))
        }
        Command::Operator(args) => {
            let _telemetry = telemetry("warn", "millracer-operator");
            runtime.block_on(operator::run(args))
        }
        Command::Operations(command) => {
            let _telemetry = telemetry("warn", "millracer-ops");
            runtime.block_on(millracer::app::commands::run(command))
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// [`exit_code`], with a worker's refusals keeping their own code (2: a collision).
fn worker_exit_code(outcome: anyhow::Result<()>) -> i32 {
    if let Err(err) = &outcome {
        if let Some(refusal) = err.downcast_ref::<worker::Refusal>() {
            eprintln!("millracer: error: {refusal}");
            return i32::from(refusal.code);
        }
        // Already said as an ERROR line naming the server and what is needed.
        if err.downcast_ref::<Incompatible>().is_some() {
            return i32::from(worker::EXIT_INCOMPATIBLE_BROKER);
        }
    }
    exit_code(outcome)
}

/// 0, or 1 with the error on stderr in the reference's wording.
fn exit_code(outcome: anyhow::Result<()>) -> i32 {
    match outcome {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("millracer: error: {err:#}");
            1
        }
    }
}
