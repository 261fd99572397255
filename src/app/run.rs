//! `millracer run`: one task, from the arguments or stdin (or a legacy JSON request with
//! `--benchmark-json`), to its final answer.
//!
//! Output as the reference prints it: `--output text` puts each warning on stderr
//! (`millracer: warning: …`) and the answer on stdout; `--output json` prints the legacy
//! RunResult document. Exit 0 whenever the task got an answer, whatever the outcome;
//! `millracer: error: …` on stderr and exit 1 otherwise.

use std::io::{Read, Write};
use std::path::PathBuf;

use super::delegate::BusDelegate;
use crate::agent::legacy::parse_benchmark_request;
use crate::agent::pi::{PiRunner, SessionKind};
use crate::agent::runner;
use crate::app::cli::{Intake, OutputFormat, PiSessionArg, Route, RunArgs};
use crate::app::ops::Link;
use crate::contract::ScopedWorkItem;
use crate::millrace::intake::IntakeKind;
use crate::millrace::workspace::resolve_path;

/// What to run, from the arguments, stdin or the legacy request.
struct Input {
    task: String,
    workspace: PathBuf,
    scoped: Option<ScopedWorkItem>,
    intake: Option<IntakeKind>,
}

fn read_input(args: &RunArgs) -> Result<Input, String> {
    let mut stdin = String::new();
    if args.benchmark_json {
        std::io::stdin()
            .read_to_string(&mut stdin)
            .map_err(|e| e.to_string())?;
        let request = parse_benchmark_request(&stdin).map_err(|e| e.to_string())?;
        return Ok(Input {
            task: request.task,
            workspace: request.workspace.unwrap_or_else(|| args.workspace.clone()),
            scoped: request.scoped_work_item,
            intake: request.intake_kind,
        });
    }
    let mut task = args.task.join(" ").trim().to_string();
    if task.is_empty() {
        std::io::stdin()
            .read_to_string(&mut stdin)
            .map_err(|e| e.to_string())?;
        task = stdin.trim().to_string();
    }
    if task.is_empty() {
        return Err("task text is required".to_string());
    }
    Ok(Input {
        task,
        workspace: args.workspace.clone(),
        scoped: None,
        intake: None,
    })
}

/// The CLI's `--intake` when it is not `auto`.
pub fn forced_intake(intake: Intake) -> Option<IntakeKind> {
    match intake {
        Intake::Auto => None,
        Intake::Probe => Some(IntakeKind::Probe),
        Intake::Idea => Some(IntakeKind::Idea),
        Intake::Task => Some(IntakeKind::Task),
    }
}

/// The CLI's `--route` in the contract's vocabulary.
pub fn route_of(route: Route) -> crate::contract::Route {
    match route {
        Route::Auto => crate::contract::Route::Auto,
        Route::Direct => crate::contract::Route::Direct,
        Route::Millrace => crate::contract::Route::Millrace,
    }
}

pub async fn run(args: RunArgs) -> i32 {
    let input = match read_input(&args) {
        Ok(input) => input,
        Err(err) => {
            eprintln!("millracer: error: {err}");
            return 1;
        }
    };
    // `--intake` wins over the legacy request's `intake_kind`.
    let intake = forced_intake(args.common.intake).or(input.intake);
    let workspace = resolve_path(&input.workspace);
    let cwd = resolve_path(args.common.cwd.as_deref().unwrap_or(&input.workspace));
    let kind = match args.pi_session {
        PiSessionArg::Rpc => SessionKind::Rpc,
        PiSessionArg::Print => SessionKind::Print,
    };
    let config = match args.common.pi_config(kind, Some(&workspace)) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("millracer: error: {err}");
            return 1;
        }
    };
    let session = PiRunner::new(config).session(&cwd);
    let link = Link {
        transport: args.transport,
        nats: args.nats.clone(),
        timeout: None,
        workspace: workspace.clone(),
        common: args.common.clone(),
        submit: args.submit,
        host_id: None,
        wait_for_worker: false,
    };
    let options = runner::Options {
        workspace: &workspace,
        route: route_of(args.common.route),
        intake,
        scoped: input.scoped.as_ref(),
        notify: args.common.notify(),
    };
    let delegate = BusDelegate {
        link: &link,
        workspace: &workspace,
        surface: "run",
    };
    let outcome = runner::run(&session, &input.task, &options, delegate).await;
    let result = match outcome {
        Ok(result) => result,
        Err(err) => {
            session.close().await;
            eprintln!("millracer: error: {err}");
            return 1;
        }
    };
    {
        let mut stdout = std::io::stdout().lock();
        match args.output {
            OutputFormat::Json => {
                let _ = writeln!(stdout, "{}", result.to_pretty_json());
            }
            OutputFormat::Text => {
                for warning in &result.warnings {
                    eprintln!("millracer: warning: {warning}");
                }
                let _ = writeln!(stdout, "{}", result.output);
            }
        }
        let _ = stdout.flush();
    }
    // The answer is out before pi is shut down.
    session.close().await;
    0
}
