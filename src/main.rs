use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use millracer::cli::{Cli, Command};
use millracer::{bridge, commands, logging, worker};

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
    let code = match cli.command {
        Command::Worker(args) => {
            logging::init(cli.log_format, "info");
            match runtime.block_on(worker::run(args)) {
                Ok(()) => 0,
                Err(err) => {
                    eprintln!("millracer: error: {err:#}");
                    1
                }
            }
        }
        Command::Ops(args) => {
            logging::init(cli.log_format, "warn");
            runtime.block_on(bridge::run(args))
        }
        Command::Run(args) => {
            logging::init(cli.log_format, "warn");
            runtime.block_on(commands::run::run(args))
        }
        Command::Operator(args) => {
            logging::init(cli.log_format, "warn");
            runtime.block_on(commands::operator::run(args))
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
