// bench/peer_intake.py's peer: @supabase/stripe-sync-engine's processWebhook behind node:http.
// `node server.js migrate` applies its migrations; `node server.js` serves POST /webhooks/stripe.
// Env: DATABASE_URL, STRIPE_WEBHOOK_SECRET, PORT. The secret key is a placeholder: with the
// library's defaults (no revalidation, no list expansion, no backfill) the charge.*, refund.* and
// charge.dispute.* events the bench sends never call Stripe's API.
const http = require('node:http')
const { StripeSync, runMigrations } = require('@supabase/stripe-sync-engine')

const databaseUrl = process.env.DATABASE_URL
// Content-Length, not chunked: the bench's lean HTTP client reads framed answers only.
const answer = (res, status, body) => {
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  res.end(body)
}
if (process.argv[2] === 'migrate') {
  runMigrations({ databaseUrl, schema: 'stripe', logger: console }).then(() => process.exit(0))
} else {
  const sync = new StripeSync({
    poolConfig: { connectionString: databaseUrl },
    stripeSecretKey: 'sk_test_bench_placeholder_never_used',
    stripeWebhookSecret: process.env.STRIPE_WEBHOOK_SECRET,
  })
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/readyz') return answer(res, 200, '{"ready":true}')
    const chunks = []
    req.on('data', (chunk) => chunks.push(chunk))
    req.on('end', () => {
      sync
        .processWebhook(Buffer.concat(chunks), req.headers['stripe-signature'])
        .then(() => answer(res, 200, '{"received":true}'))
        .catch((err) => answer(res, err.type === 'StripeSignatureVerificationError' ? 400 : 500, err.message))
    })
  })
  server.listen(Number(process.env.PORT), '127.0.0.1')
  process.on('SIGTERM', () => server.close(() => sync.postgresClient.pool.end().then(() => process.exit(0))))
}
