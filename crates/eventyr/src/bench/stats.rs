//! Small statistics for benchmark reports: latency histograms and medians.

use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, from 1 µs to 60 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// A quantile in milliseconds.
pub fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Runs `clients` closed-loop clients until `duration` has passed: each calls
/// `op(client, n, random)` for its `n`-th operation, again and again (a client waits for
/// its operation before the next). Returns the completed operations per second and
/// their latencies.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(f64, Histogram<u64>)>
where
    F: Fn(usize, u64, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let started = std::time::Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(client as u64);
                let mut latency = latency_histogram();
                let mut n = 0;
                while std::time::Instant::now() < deadline {
                    let begun = std::time::Instant::now();
                    op(client, n, rng.u64(..)).await?;
                    record(&mut latency, begun.elapsed());
                    n += 1;
                }
                anyhow::Ok(latency)
            })
        })
        .collect();
    let mut latency = latency_histogram();
    for task in tasks {
        latency
            .add(task.await??)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    }
    Ok((
        latency.len() as f64 / started.elapsed().as_secs_f64(),
        latency,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
