//! A listener out of file descriptors backs off instead of spinning, and serves again
//! once descriptors are free. Its own test binary: it lowers this process's descriptor
//! limit, which every test in the same process would feel.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use eventyr_gateway::server::{ServerLimits, serve};

mod common;

/// This process's CPU time so far (a clock: reading it needs no descriptor).
fn cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_listener_backs_off_and_recovers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let router = Router::new().route("/", get(|| async { "ok" }));
    tokio::spawn(serve(
        "test",
        listener,
        ServerLimits::default(),
        move |_| router.clone(),
        common::futures_pending(),
        Duration::from_secs(1),
        None,
    ));

    // Use up the descriptors this process may open (a limit just above what it has).
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let original = getrlimit(Resource::Nofile);
    let open_now = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(open_now + 16),
            maximum: original.maximum,
        },
    )
    .expect("setrlimit");
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    // Clients in processes of their own (their own descriptor tables) connect and
    // wait: the server's accept fails for want of a descriptor.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            std::process::Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "exec 3<>/dev/tcp/127.0.0.1/{}; sleep 3",
                    address.port()
                ))
                .spawn()
                .expect("bash"),
        );
    }
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_time() - before;
    assert!(
        spent < Duration::from_millis(300),
        "the accept loop spun: {spent:?} of CPU in 1 s"
    );

    // Descriptors free again: served.
    drop(held);
    setrlimit(Resource::Nofile, original).expect("setrlimit");
    common::eventually("served again", async || {
        reqwest::get(format!("http://{address}/"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    for mut client in clients {
        let _ = client.kill();
        let _ = client.wait();
    }
}
