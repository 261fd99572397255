//! `millracer operator`: a session people type tasks into. One pi RPC process serves every
//! turn of every task, so pi sees the whole conversation.
//!
//! The prompt `millracer> ` goes to stdout; `/exit`, `/quit` or end of input ends the
//! session; empty lines are skipped. Each task's warnings go to stderr and its answer to
//! stdout. Unlike the reference, a failed task does not end the session (pi's session is
//! replaced if it died); the exit code is 1 when any task failed.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::delegate::BusDelegate;
use super::run::{forced_intake, route_of};
use crate::agent::pi::{PiRunner, SessionKind};
use crate::agent::runner;
use crate::app::cli::OperatorArgs;
use crate::app::ops::Link;
use crate::millrace::workspace::resolve_path;

pub async fn run(args: OperatorArgs) -> i32 {
    let workspace = resolve_path(&args.workspace);
    let cwd = resolve_path(args.common.cwd.as_deref().unwrap_or(&args.workspace));
    let config = match args.common.pi_config(SessionKind::Rpc, Some(&workspace)) {
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
        intake: forced_intake(args.common.intake),
        scoped: None,
        notify: args.common.notify(),
    };
    eprintln!("Millracer operator ready. Type /exit to quit.");
    // pi's start-up (over a second of Node) overlaps the typing of the first task.
    session.start().await;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut failed = false;
    loop {
        {
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "millracer> ");
            let _ = stdout.flush();
        }
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(err) => {
                eprintln!("millracer: error: {err}");
                failed = true;
                break;
            }
        };
        let task = line.trim();
        if task == "/exit" || task == "/quit" {
            break;
        }
        if task.is_empty() {
            continue;
        }
        let delegate = BusDelegate {
            link: &link,
            workspace: &workspace,
            surface: "operator",
        };
        match runner::run(&session, task, &options, delegate).await {
            Ok(result) => {
                for warning in &result.warnings {
                    eprintln!("millracer: warning: {warning}");
                }
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{}", result.output);
                let _ = stdout.flush();
            }
            Err(err) => {
                eprintln!("millracer: error: {err}");
                failed = true;
            }
        }
    }
    session.close().await;
    i32::from(failed)
}
