// Drives Redis with ioredis (libuv: write/writev and read), pipelined and one by one.
// Usage: node ioredis_pipeline.js PORT ; prints the number of commands it sent.
const Redis = require('ioredis');

async function main() {
  const port = Number(process.argv[2]);
  const redis = new Redis({ port, host: '127.0.0.1', enableReadyCheck: false, lazyConnect: false });
  let sent = 0;
  const pipeline = redis.pipeline();
  for (let i = 0; i < 300; i++) {
    pipeline.set(`node:${i}`, 'x'.repeat(i));
    pipeline.get(`node:${i}`);
    sent += 2;
  }
  await pipeline.exec();
  for (let i = 0; i < 20; i++) {
    await redis.incr('node:counter');
    sent += 1;
  }
  await redis.set('node:big', 'y'.repeat(200000));
  await redis.get('node:big');
  sent += 2;
  await new Promise((resolve) => setTimeout(resolve, 300));
  await redis.quit();
  sent += 1;
  console.log(sent);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
