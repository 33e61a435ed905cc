// The page a browser loads from its own origin: it calls the service
// through grpc-web (connect-web, messages generated from proto/) and one
// REST route, and shows what each call answered in #result. Where to call
// and the token come from the page's query string.
import { createClient, ConnectError } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { CheckinService } from "./gen/billing/v1/checkin_pb";
import { CreditsService } from "./gen/billing/v1/credits_pb";
import { PacksService } from "./gen/billing/v1/packs_pb";

const params = new URLSearchParams(location.search);
const grpcUrl = params.get("grpc") ?? "";
const restUrl = params.get("rest") ?? "";
const token = params.get("token") ?? "";

const transport = createGrpcWebTransport({ baseUrl: grpcUrl });
const packs = createClient(PacksService, transport);
const credits = createClient(CreditsService, transport);
const checkin = createClient(CheckinService, transport);
const auth = { headers: { authorization: `Bearer ${token}` } };

type Shown = Record<string, unknown>;

async function step(out: Shown, name: string, call: () => Promise<unknown>) {
  try {
    out[name] = await call();
  } catch (e) {
    out[name] = {
      error: e instanceof ConnectError ? `connect:${e.code}` : "fetch",
      message: e instanceof Error ? e.message : String(e),
    };
  }
}

async function run() {
  const out: Shown = {};
  await step(out, "listPacks", async () => (await packs.listPacks({})).packs.map((p) => p.id));
  await step(out, "checkin", async () => {
    const r = await checkin.checkin({}, auth);
    return { creditsAwardedMicros: r.creditsAwardedMicros.toString(), streak: r.streak };
  });
  await step(out, "getBalance", async () => {
    const r = await credits.getBalance({}, auth);
    return { balanceMicros: r.balanceMicros.toString() };
  });
  await step(out, "restPacks", async () => {
    const r = await fetch(`${restUrl}/credits/packs`);
    const body = await r.json();
    return body.data.map((p: { id: string }) => p.id);
  });
  const result = document.getElementById("result");
  if (result) result.textContent = JSON.stringify(out);
  document.body.dataset.done = "1";
}

void run();
