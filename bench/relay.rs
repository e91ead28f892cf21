//! Benchmark reference: the least a proxy can do. Accepts connections and copies bytes both
//! ways to a fixed upstream (no parsing, no policy), with one single-threaded runtime per
//! core, as moat's workers. Its requests/s through the same load is the ceiling for any
//! proxy on this machine.
//!
//! bench-relay LISTEN UPSTREAM

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listener = std::net::TcpListener::bind(&args[0]).unwrap();
    listener.set_nonblocking(true).unwrap();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().unwrap();
            let upstream = args[1].clone();
            std::thread::spawn(move || relay(listener, upstream))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn relay(listener: std::net::TcpListener, upstream: String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((mut client, _)) = listener.accept().await else { continue };
            let upstream = upstream.clone();
            tokio::task::spawn_local(async move {
                let _ = client.set_nodelay(true);
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let _ = up.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
}
