// Serves the page (index.html + dist/bundle.js) from two origins of its own,
// one the service allows (CORS_ALLOWED_ORIGINS) and one it does not, loads it
// in Debian's headless chromium through playwright-core, and checks what the
// page shows. Exits non-zero on any difference.
//
//   GRPC_URL, REST_URL  where the service listens
//   TOKEN               a user token for the organization the page acts for
//   ALLOWED_PORT        port of the allowed origin (http://localhost:PORT)
//   DENIED_PORT         port of an origin the service does not allow
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const here = new URL(".", import.meta.url).pathname;
const files = {
  "/": ["text/html", readFileSync(`${here}index.html`)],
  "/bundle.js": ["text/javascript", readFileSync(`${here}dist/bundle.js`)],
};

function serve(port) {
  const server = createServer((req, res) => {
    const file = files[new URL(req.url, "http://x").pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": file[0] }).end(file[1]);
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

const query = new URLSearchParams({
  grpc: env("GRPC_URL"),
  rest: env("REST_URL"),
  token: env("TOKEN"),
}).toString();

const servers = [await serve(Number(env("ALLOWED_PORT"))), await serve(Number(env("DENIED_PORT")))];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

async function show(port) {
  const page = await browser.newPage();
  await page.goto(`http://localhost:${port}/?${query}`);
  await page.waitForSelector("body[data-done='1']", { timeout: 30_000 });
  const text = await page.textContent("#result");
  await page.close();
  return JSON.parse(text);
}

let failures = 0;
function expect(name, ok, shown) {
  console.log(`${ok ? "ok  " : "FAIL"} browser: ${name}${ok ? "" : `: ${JSON.stringify(shown)}`}`);
  if (!ok) failures += 1;
}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

try {
  const allowed = await show(env("ALLOWED_PORT"));
  const packs = ["pack-1", "pack-2", "pack-3"];
  expect("ListPacks over grpc-web", same(allowed.listPacks?.slice(0, 3), packs), allowed.listPacks);
  expect(
    "Checkin over grpc-web awards the day's 5 credits",
    same(allowed.checkin, { creditsAwardedMicros: "5000000", streak: 1 }),
    allowed.checkin,
  );
  expect(
    "GetBalance over grpc-web shows them",
    same(allowed.getBalance, { balanceMicros: "5000000" }),
    allowed.getBalance,
  );
  expect("REST /credits/packs from the page", same(allowed.restPacks?.slice(0, 3), packs), allowed.restPacks);

  // Swagger UI at /docs, served by the binary with no network: it renders
  // an operation for every documented route.
  const docs = await browser.newPage();
  await docs.goto(`${env("REST_URL")}/docs/`);
  await docs.waitForSelector(".opblock", { timeout: 30_000 });
  const operations = await docs.locator(".opblock").count();
  await docs.close();
  expect(`/docs renders the document (${operations} operations)`, operations >= 30, operations);

  const denied = await show(env("DENIED_PORT"));
  // The browser withholds the answer (no Access-Control-Allow-Origin).
  const refused = (r) => r && typeof r.message === "string" && r.message.includes("Failed to fetch");
  expect("an origin the service does not allow cannot call grpc-web", refused(denied.listPacks) && refused(denied.checkin), denied);
  expect("nor REST", refused(denied.restPacks), denied.restPacks);
} finally {
  await browser.close();
  for (const s of servers) s.close();
}
process.exit(failures === 0 ? 0 : 1);
