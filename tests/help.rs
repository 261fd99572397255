//! The command line explains itself: every option of every subcommand has a description,
//! options that take a value without a default say what happens without them, every
//! subcommand shows an example, and `events` takes `--replay` alone.

use clap::CommandFactory;
use millracer::app::cli::Cli;

/// Walks the command tree, collecting what lacks an explanation.
fn walk(cmd: &clap::Command, path: &str, faults: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let name = arg
            .get_long()
            .map_or_else(|| id.to_string(), |l| format!("--{l}"));
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        if help.trim().is_empty() {
            faults.push(format!("{path} {name}: no help text"));
            continue;
        }
        let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
        if takes_value
            && !arg.is_positional()
            && !arg.is_required_set()
            && arg.get_default_values().is_empty()
            && !help.contains("default")
        {
            faults.push(format!(
                "{path} {name}: takes a value, has no default and its help does not say what happens without it (\"default: …\")"
            ));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let sub_path = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() {
            faults.push(format!("{sub_path}: no description"));
        }
        if !sub
            .get_after_help()
            .is_some_and(|h| h.to_string().contains("Examples:"))
        {
            faults.push(format!("{sub_path}: no example in --help"));
        }
        walk(sub, &sub_path, faults);
    }
}

#[test]
fn every_option_of_every_subcommand_is_explained() {
    let mut cli = Cli::command();
    // Built, so each argument knows how many values it takes.
    cli.build();
    let mut faults = Vec::new();
    walk(&cli, "millracer", &mut faults);
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

#[test]
fn the_fault_finder_finds_a_bare_option() {
    // The walk above can fail: an option without help is reported.
    let mut bare = clap::Command::new("x")
        .arg(clap::Arg::new("thing").long("thing"))
        .arg(clap::Arg::new("other").long("other").help("An other."));
    bare.build();
    let mut faults = Vec::new();
    walk(&bare, "x", &mut faults);
    assert_eq!(
        faults,
        vec![
            "x --thing: no help text".to_string(),
            "x --other: takes a value, has no default and its help does not say what happens without it (\"default: …\")".to_string(),
        ]
    );
}

#[test]
fn events_takes_replay_alone_and_names_both_when_neither_is_given() {
    use clap::Parser;
    Cli::try_parse_from(["millracer", "events", "--replay"]).expect("--replay alone is fine");
    Cli::try_parse_from(["millracer", "events", "--follow"]).expect("--follow alone is fine");
    let err = Cli::try_parse_from(["millracer", "events"]).expect_err("one of them is needed");
    let text = err.to_string();
    assert!(
        text.contains("--follow") && text.contains("--replay"),
        "{text}"
    );
}

#[test]
fn worker_help_tells_the_two_result_lifetimes_apart_and_documents_core_only() {
    let mut cli = Cli::command();
    let worker = cli
        .find_subcommand_mut("worker")
        .expect("worker subcommand")
        .clone();
    let help = worker.clone().render_long_help().to_string();
    for needle in [
        "--result-ttl-seconds",
        "In this worker's memory",
        "--result-retention-seconds",
        "On the broker",
        "--core-only",
        "--ready-file",
        "millrace init",
        "Exit codes:",
    ] {
        assert!(
            help.contains(needle),
            "worker --help lacks {needle:?}:\n{help}"
        );
    }
}
