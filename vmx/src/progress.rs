//! Progress of long work (saving or loading guest memory): a bar on a terminal, a log line
//! every quarter otherwise (for 256 MiB and more).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use monitor::module::Progress;

/// A progress callback for `what` (e.g. "saving memory").
pub fn reporter(what: impl Into<String>) -> Progress {
    let what: String = what.into();
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what);
        Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
        })
    } else {
        let quarter = AtomicU64::new(0);
        Arc::new(move |done, total| {
            if total < 256 << 20 || total == 0 {
                return;
            }
            let q = done * 4 / total;
            if quarter.fetch_max(q, Ordering::Relaxed) < q {
                log::info!(
                    "{what}: {}% ({} of {} MiB)",
                    q * 25,
                    done >> 20,
                    total >> 20
                );
            }
        })
    }
}
