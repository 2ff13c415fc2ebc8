//! `ipvslb`: bare-metal LoadBalancer Services for Kubernetes, with Linux IPVS.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use ipvslb::translate::ClassPolicy;
use ipvslb::{ClassArgs, manifests, plan, retire, run};

/// Assigns VIPs to LoadBalancer Services from IPPools and programs Linux IPVS to serve them.
#[derive(Parser)]
#[command(name = "ipvslb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against a cluster: the allocator, the director, or both.
    Run(Box<run::RunArgs>),
    /// Decide VIPs and the IPVS table from manifests, offline: no cluster, no kernel.
    Plan(PlanArgs),
    /// Print ipvslb's CustomResourceDefinitions as YAML.
    Crds,
    /// Show this host's director: the table it wants next to the kernel's, in sync or not,
    /// its VIPs and whether this host announces each, and the backends down.
    Status(ipvslb::status::StatusArgs),
    /// Act on this host's director.
    Director {
        #[command(subcommand)]
        command: DirectorCommand,
    },
}

#[derive(Subcommand)]
enum DirectorCommand {
    /// Take this director out of service (after stopping it): remove every IPVS virtual service
    /// and VIP address it owns (an address in some IPPool or on its interface), nothing else.
    Retire(retire::RetireArgs),
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Manifest files or directories (multi-document YAML; directories are read one level deep).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(flatten)]
    classes: ClassArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Tables for people.
    Text,
    /// One JSON object for programs.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Plan(args) => plan_command(args),
        Command::Crds => ipvslb_api::crds_yaml()
            .map(|yaml| print(&yaml))
            .map_err(|e| format!("rendering the CRDs: {e}")),
        Command::Status(args) => runtime().and_then(|r| {
            r.block_on(ipvslb::status::status(args))
                .map(|text| print(&text))
                .map_err(|e| e.to_string())
        }),
        Command::Director {
            command: DirectorCommand::Retire(args),
        } => runtime().and_then(|r| r.block_on(retire::retire(args)).map(|text| print(&text))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(args: run::RunArgs) -> Result<(), String> {
    let runtime = runtime()?;
    let result = runtime.block_on(run::run(args));
    // A data-plane call still blocked past the shutdown deadline must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        // The data plane's blocking calls are bounded by the reconcile concurrency; the
        // default of 512 threads would only hold idle stacks.
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))
}

fn plan_command(args: PlanArgs) -> Result<(), String> {
    let manifests = manifests::Manifests::read(&args.files).map_err(|e| e.to_string())?;
    let classes = ClassPolicy {
        class: args.classes.load_balancer_class,
        unclassed: args.classes.unclassed_services,
    };
    let outcome = plan::run(&manifests, &classes).map_err(|e| e.to_string())?;
    for note in &outcome.notes {
        eprintln!("note: {note}");
    }
    print(&match args.output {
        Format::Text => outcome.to_text(),
        Format::Json => outcome.to_json() + "\n",
    });
    Ok(())
}

/// Prints all at once, so a failure never leaves half an output; a closed pipe is not an error.
fn print(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
