//! What `loadgen pubsub` hands back once the run is over: the run's
//! counters, histograms and series turned into the shared [`WorkerResult`]
//! and the pubsub figures ([`PubsubReport`], with the `--share-group`
//! spread in [`SharedReport`]), with the failures the final tallies imply
//! (lost, unacknowledged, QoS 2 duplicates, out of order) counted; then the
//! report built from them, its table printed, and the JSON and SVG written
//! where `--json` and `--plot` ask. Nothing here touches a socket.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use coremq::proto::codec::QoS;

use super::run::Run;
use super::{PubsubArgs, Shape};
use crate::report::{self, BrokerSamples, PubsubReport, Report, SharedReport};
use crate::spec::{hist_to_b64, Mode, WorkerResult};
use crate::sys::{rusage_cpu_s, self_max_rss_kb};

/// Finishes `run` and reports it: the table on stdout, then `--json` and
/// `--plot`. Exit code 0 when nothing failed.
pub(super) fn write(
    a: &PubsubArgs,
    run: Run,
    params: serde_json::Value,
    started_unix: u64,
    t0: Instant,
    source_ips: u32,
) -> Result<i32> {
    let (wr, ps, samples) = run.finish();
    let rep = Report::build(
        report::RunInfo {
            mode: Mode::Pubsub,
            broker: a.common.broker.clone(),
            sub_broker: a.sub_broker.clone(),
            broker_pids: a.common.broker_pid.clone(),
            workers: 1,
            source_ips,
            keepalive: a.keepalive,
            params,
            started_unix,
            total_wall_s: t0.elapsed().as_secs_f64(),
            main_secs: a.duration,
            parent_cpu_s: rusage_cpu_s(libc::RUSAGE_SELF),
            children_cpu_s: 0.0,
            protocol: a.common.protocol,
            pubsub: Some(ps),
            // pubsub holds no steady population of connections to divide by.
            slab: (None, None),
        },
        &[wr],
        samples,
    )?;
    print!("{}", rep.table());
    if let Some(path) = &a.common.json {
        let s = serde_json::to_string_pretty(&rep)?;
        std::fs::write(path, s + "\n").with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &a.common.plot {
        std::fs::write(path, crate::plot::svg(&rep))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(if rep.failed_total > 0 { 1 } else { 0 })
}

impl Run {
    /// --share-group: the groups and how the deliveries spread over their
    /// members (the subscribers whose SUBACK came).
    fn shared_report(&self, group: &str) -> SharedReport {
        let (groups, members) = match self.cfg.shape {
            Shape::Pairs => (self.cfg.n, 1),
            Shape::FanIn => (1, 1),
            Shape::FanOut => (1, self.cfg.subs),
        };
        let got = || {
            self.member_deliveries
                .iter()
                .zip(&self.subs)
                .filter(|(_, s)| s.subscribed)
                .map(|(&n, _)| n)
        };
        SharedReport {
            group: group.to_string(),
            groups,
            members_per_group: members,
            member_deliveries_min: got().min().unwrap_or(0),
            member_deliveries_max: got().max().unwrap_or(0),
            members_without_delivery: got().filter(|&n| n == 0).count() as u64,
        }
    }

    /// The run as a worker result (for the shared report), the pubsub
    /// figures, and the broker samples.
    fn finish(mut self) -> (WorkerResult, PubsubReport, BrokerSamples) {
        let qos = self.cfg.qos;
        let lost = self.expected.saturating_sub(self.unique);
        if qos != QoS::AtMostOnce {
            self.fail_n("lost", lost);
            self.fail_n("unacked", self.unacked);
        }
        if qos == QoS::ExactlyOnce {
            self.fail_n("qos2_duplicates", self.duplicates);
        }
        // MQTT-4.6.0-6: one publisher, one topic, one QoS: an ordered stream.
        self.fail_n("out_of_order", self.out_of_order);
        let window = self.window_wall_s;
        let per_s = |n: u64| {
            if window > 0.0 {
                (n as f64 / window).round()
            } else {
                0.0
            }
        };
        let ps = PubsubReport {
            shape: self.cfg.shape.name().to_string(),
            n: self.cfg.n,
            publishers: self.cfg.pubs,
            subscribers: self.cfg.subs,
            qos: qos as u8,
            payload_bytes: self.cfg.payload,
            window: u32::from(self.cfg.window),
            rate: (self.cfg.rate > 0.0).then_some(self.cfg.rate),
            persistent: self.cfg.persistent,
            subscribed: self.subscribed,
            publishers_connected: self.pubs_connected,
            published: self.published,
            acked: self.acked,
            unacked: self.unacked,
            delivered: self.delivered,
            unique: self.unique,
            expected: self.expected,
            lost,
            lost_pct: if self.expected > 0 {
                (lost as f64 * 1e5 / self.expected as f64).round() / 1e3
            } else {
                0.0
            },
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            streams: if self.shared_fan_out {
                self.member_order.len()
            } else {
                self.streams.len()
            } as u64,
            streams_out_of_order: if self.shared_fan_out {
                self.member_order.iter().filter(|m| m.any_late).count()
            } else {
                self.streams.iter().filter(|s| s.any_late).count()
            } as u64,
            misrouted: self.misrouted,
            untracked: self.untracked,
            exactly_once_violated: qos == QoS::ExactlyOnce && self.duplicates > 0,
            setup_s: (self.setup_wall_s * 1000.0).round() / 1000.0,
            publish_s: (window * 1000.0).round() / 1000.0,
            drain_s: (self.drain_s * 1000.0).round() / 1000.0,
            drain_timed_out: self.drain_timed_out,
            publishes_per_s: per_s(self.published),
            deliveries_in_window: self.in_window,
            deliveries_per_s: per_s(self.in_window),
            rate_behind: self.rate_behind,
            receive_maximum: self.receive_maximum,
            shared: self.cfg.group.as_ref().map(|g| self.shared_report(g)),
        };
        let mut hists = BTreeMap::new();
        let ack_name = if qos == QoS::ExactlyOnce {
            "pubcomp"
        } else {
            "puback"
        };
        for (name, h) in [
            ("e2e", &self.h_e2e),
            ("connack", &self.h_connack),
            ("suback", &self.h_suback),
            (ack_name, &self.h_ack),
            ("tcp_connect", &self.h_tcp),
        ] {
            if !h.is_empty() {
                hists.insert(name.to_string(), hist_to_b64(h));
            }
        }
        let wr = WorkerResult {
            index: 0,
            attempted: self.attempted,
            connected: self.connected,
            disconnected: self.disconnected,
            pings: self.pings,
            pongs: self.pongs,
            failures: std::mem::take(&mut self.failures),
            hists,
            series: std::mem::take(&mut self.series),
            ramp_wall_s: self.setup_wall_s,
            ramp_cpu_s: self.setup_cpu_s,
            main_wall_s: window,
            main_cpu_s: self.window_cpu_s,
            cpu_s: rusage_cpu_s(libc::RUSAGE_SELF),
            max_rss_kb: self_max_rss_kb(),
            ..Default::default()
        };
        let mut samples = std::mem::take(&mut self.samples);
        samples.peak_rss = [
            samples.before,
            samples.after_ramp,
            samples.end_main,
            samples.after,
        ]
        .iter()
        .flatten()
        .map(|s| s.rss_bytes)
        .fold(self.peak_rss, u64::max);
        (wr, ps, samples)
    }
}
