//! `synthorg-s3-server DIR BUCKET [PORT]`: the tests' in-process S3 server
//! as a process, for bench/run and for tests that stop the server. Prints `listening on ADDR`, then serves until
//! killed. Credentials: see `synthorg_tests::s3_server::{ACCESS, SECRET}`.

use synthorg_tests::s3_server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(bucket)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: synthorg-s3-server DIR BUCKET [PORT]");
    };
    let port = args.next().map(|p| p.parse()).transpose()?.unwrap_or(0);
    let server = Server::start_in(std::path::Path::new(&dir), &[bucket.as_str()], port).await;
    println!("listening on {}", server.addr);
    std::future::pending::<()>().await;
    Ok(())
}
