// Transactions, pipelines and pub/sub with ioredis (write/writev + read).
// Usage: node ioredis_semantics.js PORT
const Redis = require('ioredis');

async function main() {
  const port = Number(process.argv[2]);
  const redis = new Redis({ port, host: '127.0.0.1', enableReadyCheck: false });
  const sub = new Redis({ port, host: '127.0.0.1', enableReadyCheck: false });
  await redis.multi().set('n:a', '1').incr('n:a').hset('n:h', 'f', 'v').exec();
  await redis.multi().set('n:s', 'x').lpush('n:s', 'y').exec().catch(() => {});
  const pipeline = redis.pipeline();
  for (let i = 0; i < 100; i++) pipeline.incrby('n:counter', i);
  await pipeline.exec();
  let got = 0;
  const done = new Promise((resolve) => sub.on('message', () => { if (++got === 3) resolve(); }));
  await sub.subscribe('chan');
  for (let i = 0; i < 3; i++) await redis.publish('chan', `hello ${i}`);
  await done;
  await sub.unsubscribe('chan');
  await new Promise((resolve) => setTimeout(resolve, 300));
  await sub.quit();
  await redis.quit();
  console.log('ok');
}

main().catch((err) => { console.error(err); process.exit(1); });
