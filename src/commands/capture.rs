//! `candor capture`: save a stream's input topics as JSON lines, for `candor replay --capture`.

use std::path::PathBuf;

use anyhow::Result;

use super::{KafkaArgs, Report};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Stop reading a topic after this many seconds without a message.
    #[arg(long, default_value_t = 2.0)]
    idle: f64,
}

pub fn run(args: Args) -> Result<CaptureReport> {
    let connection = args.kafka.connection()?;
    let topics = candor::stream::Topics::with_prefix(&args.kafka.topic_prefix);
    let messages = candor::stream::capture::capture(
        &connection,
        &topics,
        &args.out,
        std::time::Duration::from_secs_f64(args.idle),
    )?;
    Ok(CaptureReport { file: args.out, messages })
}

/// The file written and how many messages it holds: always one JSON line.
pub struct CaptureReport {
    file: PathBuf,
    messages: usize,
}

impl Report for CaptureReport {
    fn table(&self) -> Result<()> {
        self.json()
    }

    fn json(&self) -> Result<()> {
        println!("{}", serde_json::json!({"command": "capture", "file": self.file, "messages": self.messages}));
        Ok(())
    }
}
