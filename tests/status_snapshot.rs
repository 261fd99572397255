//! `status` snapshots: the real runtime is asked once while nothing changes, again as
//! soon as its files change, and again when the snapshot is too old.

mod common;

use std::time::Duration;

use common::{Workspace, millrace_bin};
use millracer::millrace::command::Millrace;
use millracer::millrace::status::StatusCache;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_shared_until_the_runtime_files_change_or_it_ages() {
    let ws = Workspace::init();
    let millrace = Millrace::new(
        millrace_bin().display().to_string(),
        Duration::from_secs(60),
    );
    let cache = StatusCache::new(Duration::from_secs(3));
    let root = ws.path();

    // Eight concurrent requests share one refresh.
    let all = futures::future::join_all((0..8).map(|_| cache.status(&millrace, root, root))).await;
    for status in &all {
        let status = status.as_ref().expect("status");
        assert_eq!(status["workspace"], root.display().to_string());
    }
    assert_eq!(cache.refreshes(), 1);
    cache.status(&millrace, root, root).await.expect("status");
    assert_eq!(
        cache.refreshes(),
        1,
        "unchanged and young: served from the snapshot"
    );

    // A change under millrace-agents/ makes the next request ask again.
    std::fs::write(root.join("millrace-agents").join("touched.txt"), "x").expect("touch");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.refreshes() == 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.status(&millrace, root, root).await.expect("status");
    }
    assert_eq!(cache.refreshes(), 2, "a runtime file changed");

    // A change elsewhere in the workspace does not.
    std::fs::write(root.join("README.md"), "project file").expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cache.status(&millrace, root, root).await.expect("status");
    assert_eq!(cache.refreshes(), 2);

    // Too old: asked again even without a change (a dead daemon changes no file).
    tokio::time::sleep(Duration::from_secs(3)).await;
    cache.status(&millrace, root, root).await.expect("status");
    assert_eq!(cache.refreshes(), 3);
}
