//! `leaktrace top`: a terminal view of the top stacks by live bytes or by growth rate,
//! refreshed each interval. Keys: `s` switches the sort, `q` (or Esc, Ctrl-C) quits.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::frames::short_name;
use super::{human_bytes, Report};

/// What the table is sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    LiveBytes,
    Growth,
}

/// Runs the view until `q` or until the session stops sending reports; `quit` tells the
/// session. The terminal is taken over at the first report and given back on return.
pub fn run(reports: Receiver<Arc<Report>>, quit: tokio::sync::mpsc::UnboundedSender<()>) {
    let mut last = match reports.recv() {
        Ok(r) => r,
        Err(_) => return,
    };
    let mut terminal = ratatui::init();
    let mut sort = SortBy::LiveBytes;
    loop {
        let _ = terminal.draw(|f| draw(f, &last, sort));
        // Keys first, so a press is answered within 100 ms.
        if event::poll(Duration::from_millis(100)).unwrap_or(false) {
            if let Ok(Event::Key(k)) = event::read() {
                if k.kind == KeyEventKind::Press {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => break,
                        _ if ctrl_c => break,
                        KeyCode::Char('s') => {
                            sort = match sort {
                                SortBy::LiveBytes => SortBy::Growth,
                                SortBy::Growth => SortBy::LiveBytes,
                            }
                        }
                        _ => {}
                    }
                }
            }
            continue;
        }
        match reports.recv_timeout(Duration::from_millis(1)) {
            Ok(r) => last = r,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    ratatui::restore();
    let _ = quit.send(());
}

fn draw(f: &mut Frame, r: &Report, sort: SortBy) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let p = r.series.last().copied().unwrap_or_default();
    let summary = vec![
        Line::from(format!(
            "leaktrace top — pid {} ({}), {} mode, {:.0} s",
            r.target.pid, r.target.command, r.mode, r.duration_s
        )),
        Line::from(format!(
            "live {} in {} blocks | rss {} | {} allocs, {} frees | drops {} | suspects {}",
            human_bytes(p.live_bytes),
            p.live_count,
            p.rss_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            p.allocs,
            p.frees,
            r.dropped,
            r.suspects
        )),
    ];
    f.render_widget(Paragraph::new(summary), head);
    let mut sites: Vec<_> = r.sites.iter().collect();
    match sort {
        SortBy::LiveBytes => sites.sort_by_key(|s| std::cmp::Reverse(s.unfreed_bytes)),
        SortBy::Growth => sites.sort_by(|a, b| {
            b.analysis
                .growth_bytes_per_s
                .total_cmp(&a.analysis.growth_bytes_per_s)
        }),
    }
    let rows = sites.iter().map(|s| {
        let growth = s.analysis.growth_bytes_per_s;
        Row::new(vec![
            human_bytes(s.unfreed_bytes),
            s.unfreed_count.to_string(),
            if growth >= 0.0 {
                format!("{}/s", human_bytes(growth as u64))
            } else {
                format!("-{}/s", human_bytes(-growth as u64))
            },
            format!("{} {:.2}", s.analysis.class.name(), s.analysis.confidence),
            short_name(s),
        ])
    });
    let title = match sort {
        SortBy::LiveBytes => " stacks by live bytes ",
        SortBy::Growth => " stacks by growth rate ",
    };
    let table = Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(12),
            Constraint::Length(13),
            Constraint::Min(20),
        ],
    )
    .header(
        Row::new(vec!["UNFREED", "BLOCKS", "GROWTH", "VERDICT", "STACK"])
            .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(title));
    f.render_widget(table, body);
    f.render_widget(
        Paragraph::new("q quit · s sort by live bytes / growth rate"),
        foot,
    );
}
