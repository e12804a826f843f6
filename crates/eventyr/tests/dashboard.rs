//! The dashboard in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver), against `eventyr up` after a short demo. It logs in, checks that the
//! saga panel's counts match `/admin/sagas`, that an expired access token is renewed,
//! that the page updates live, opens one saga's timeline, rebuilds a projection from
//! its panel, and saves a screenshot
//! (`$CARGO_TARGET_TMPDIR/dashboard.png`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{get_json, login, up_with};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

/// chromedriver as a child process, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on a free loopback port; its URL once it answers.
async fn chromedriver() -> (Driver, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("chromedriver")
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts (scripts/test installs chromium and chromium-driver)");
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    common::wait_for("chromedriver answers", async || {
        reqwest::get(format!("{url}/status"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    (driver, url)
}

/// The number shown in `selector`'s `.value`.
async fn shown(browser: &fantoccini::Client, selector: &str) -> Option<u64> {
    let tile = browser.find(Locator::Css(selector)).await.ok()?;
    let value = tile.find(Locator::Css(".value")).await.ok()?;
    value
        .text()
        .await
        .ok()?
        .replace(',', "")
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_saga_figures_that_match_the_admin_api() {
    let dir = tempfile::tempdir().expect("dir");
    let (_system, _, services) = up_with(dir.path(), &[], Stdio::null());
    let gateway = services["gateway"].clone();
    // A short demo: orders that complete and orders that are compensated.
    let demo = common::run(
        dir.path(),
        &[
            "demo",
            "--orders",
            "40",
            "--concurrency",
            "4",
            "--url",
            &gateway,
        ],
    )
    .await;
    assert!(demo.status.success(), "{}", common::text(&demo.stderr));

    let (_driver, driver_url) = chromedriver().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let mut capabilities = fantoccini::wd::Capabilities::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,2200",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver_url)
        .await
        .expect("a Chromium session");

    browser
        .goto(&format!("{gateway}/dashboard"))
        .await
        .expect("the page loads");
    // Logged out: the login form. An admin logs in.
    browser
        .wait()
        .for_element(Locator::Css("#login-form"))
        .await
        .expect("the login form");
    for field in ["username", "password"] {
        browser
            .find(Locator::Id(field))
            .await
            .expect("the field")
            .send_keys("admin")
            .await
            .expect("type");
    }
    browser
        .find(Locator::Css("#login-form button[type=submit]"))
        .await
        .expect("button")
        .click()
        .await
        .expect("log in");

    // The saga panel's counts equal what /admin/sagas lists, status by status.
    let token = login(&gateway, "admin").await;
    let mut expected = Vec::new();
    for status in [
        "STARTED",
        "IN_PROGRESS",
        "COMPLETED",
        "COMPENSATING",
        "COMPENSATED",
        "FAILED",
    ] {
        let listed = get_json(
            &format!("{gateway}/admin/sagas?status={status}&limit=1000"),
            &token,
        )
        .await;
        let listed = listed.as_array().map_or(0, Vec::len);
        expected.push((status, listed as u64));
    }
    let total: u64 = expected.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 40, "the demo's sagas: {expected:?}");
    assert!(
        expected.iter().any(|(s, n)| *s == "COMPLETED" && *n > 0),
        "{expected:?}"
    );
    common::wait_for("the saga panel shows the admin API's counts", async || {
        for (status, count) in &expected {
            if shown(&browser, &format!("[data-status=\"{status}\"]")).await != Some(*count) {
                return false;
            }
        }
        shown(&browser, "[data-count=\"total\"]").await == Some(total)
    })
    .await;

    // An access token refused (as after its 15 minutes) is renewed with the refresh
    // token: the page reloads and goes on, without the login form.
    browser
        .execute(
            "sessionStorage.setItem('eventyr.dashboard.token', 'expired'); location.reload();",
            Vec::new(),
        )
        .await
        .expect("spoil the access token");
    common::wait_for("the page goes on with a renewed token", async || {
        let token = browser
            .execute(
                "return sessionStorage.getItem('eventyr.dashboard.token')",
                Vec::new(),
            )
            .await
            .ok();
        let renewed = token.is_some_and(|t| t.as_str().is_some_and(|t| t != "expired"));
        renewed && shown(&browser, "[data-count=\"total\"]").await == Some(total)
    })
    .await;
    let login_shown = browser
        .find(Locator::Id("login"))
        .await
        .expect("the login section")
        .is_displayed()
        .await
        .expect("displayed?");
    assert!(!login_shown, "no login form after a renewal");

    // Live: a new snapshot arrives within 2 s.
    let updated = || async {
        browser
            .find(Locator::Css("body"))
            .await
            .expect("body")
            .attr("data-updated")
            .await
            .expect("attr")
    };
    let before = updated().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while updated().await == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page updates at least every 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One saga's timeline: its steps and events.
    // (A row may be redrawn between finding and clicking it: then again.)
    let mut saga_id = None;
    for _ in 0..20 {
        let clicked = async {
            let row = browser
                .wait()
                .for_element(Locator::Css("#recent tr[data-saga]"))
                .await?;
            let id = row.attr("data-saga").await?;
            row.click().await?;
            Ok::<_, fantoccini::error::CmdError>(id)
        };
        if let Ok(id) = clicked.await {
            saga_id = id;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let saga_id = saga_id.expect("a recent saga, clicked");
    browser
        .wait()
        .for_element(Locator::Css("#timeline-events tr.event"))
        .await
        .expect("the saga's timeline");
    let shown_id = browser
        .find(Locator::Id("timeline-id"))
        .await
        .expect("id")
        .text()
        .await
        .expect("text");
    assert_eq!(shown_id, saga_id);
    let steps: u32 = browser
        .find(Locator::Css("#timeline-chart svg"))
        .await
        .expect("the chart")
        .attr("data-steps")
        .await
        .expect("attr")
        .and_then(|n| n.parse().ok())
        .expect("a step count");
    assert!(
        steps >= 2,
        "a saga of the demo has at least two step attempts"
    );
    let events = browser
        .find_all(Locator::Css("#timeline-events tr.event"))
        .await
        .expect("rows")
        .len();
    let saga = get_json(&format!("{gateway}/admin/sagas/{saga_id}"), &token).await;
    assert_eq!(
        events,
        saga["events"].as_array().map_or(0, Vec::len),
        "every event of the saga's log is on its timeline"
    );

    // A projection rebuilt from its panel: a new generation takes over.
    let generation = || async {
        let projections = get_json(&format!("{gateway}/admin/projections"), &token).await;
        projections
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == "orders"))
            .map(|p| p["generation"].clone())
            .expect("the orders projection")
    };
    let before = generation().await;
    let mut rebuilt = false;
    for _ in 0..20 {
        let clicked = async {
            browser
                .find(Locator::Css("button.rebuild[data-name=\"orders\"]"))
                .await?
                .click()
                .await
        };
        if clicked.await.is_ok() {
            rebuilt = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rebuilt, "the Rebuild button of the orders projection");
    common::wait_for("the rebuilt generation serves", async || {
        generation().await != before
    })
    .await;

    // The screenshot, a test artifact.
    browser
        .execute(
            "window.scrollTo({ top: 0, behavior: 'instant' })",
            Vec::new(),
        )
        .await
        .expect("scroll");
    let png = browser.screenshot().await.expect("a screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());
    browser.close().await.expect("close the browser");
}
