// AgentMesh from Node.js: stream one agent run through the Envoy gateway over gRPC (HTTP/2),
// then read the session back with a unary call. The message and service types come from
// gen/ts/ (protoc-gen-es v2, generated from protos/ by scripts/generate_protos.sh).
//
//   node dist/run.js --gateway 127.0.0.1:8080 --question "How do I parse JSON?" --session s1
//
// The answer text goes to stdout as its deltas arrive; everything else (run start, retrieval,
// tool calls, citations, final status, usage, session) goes to stderr, so `> answer.txt` keeps
// only the answer. Exit status: 0 when the run ended with its `final` event, 1 on a gRPC error
// (its canonical code is printed, e.g. `error: INVALID_ARGUMENT (3): ...`), 2 on bad arguments,
// 130 when interrupted with Ctrl-C (the call is cancelled, so the mesh cancels the run).

import { parseArgs } from "node:util";

import { toJsonString } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AgentService, RunStatus, type RunCompleted } from "./gen/agentmesh/agent/v1/agent_pb.js";
import { MemoryService } from "./gen/agentmesh/memory/v1/memory_pb.js";

const USAGE = `usage: node dist/run.js --question TEXT --session ID [options]

  --gateway HOST:PORT|URL  the gateway (default $AGENTMESH_GATEWAY or 127.0.0.1:8080);
                           http:// (the default) is HTTP/2 cleartext, https:// is TLS
  --question TEXT          what to ask (1..16384 characters)
  --session ID             session whose memory the run reads and extends
  --tenant NAME            x-tenant-id: the tenant to act as (dev mode: believed as sent;
                           with authentication: must be the credential's own tenant)
  --api-key KEY            x-api-key credential (default $AGENTMESH_API_KEY)
  --token JWT              bearer token credential (default $AGENTMESH_TOKEN)
  --max-steps N            upper bound on model calls (1..16; default: the orchestrator's)
  --tools a,b              tools the agent may call (default: all)
  --timeout-ms N           deadline of the run, in milliseconds (default 120000)
  --help                   this text`;

/** Command line options, validated. */
interface Options {
  baseUrl: string;
  question: string;
  session: string;
  headers: Record<string, string>;
  maxSteps: number;
  tools: string[];
  timeoutMs: number;
}

class UsageError extends Error {}

function parseOptions(argv: string[]): Options | null {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      gateway: { type: "string" },
      question: { type: "string" },
      session: { type: "string" },
      tenant: { type: "string" },
      "api-key": { type: "string" },
      token: { type: "string" },
      "max-steps": { type: "string" },
      tools: { type: "string" },
      "timeout-ms": { type: "string" },
      help: { type: "boolean" },
    },
  });
  if (values.help) return null;
  if (values.question === undefined) throw new UsageError("--question is required");
  if (values.session === undefined) throw new UsageError("--session is required");
  const gateway = values.gateway ?? process.env.AGENTMESH_GATEWAY ?? "127.0.0.1:8080";
  const headers: Record<string, string> = {};
  if (values.tenant) headers["x-tenant-id"] = values.tenant;
  const apiKey = values["api-key"] ?? process.env.AGENTMESH_API_KEY;
  const token = values.token ?? process.env.AGENTMESH_TOKEN;
  if (apiKey) headers["x-api-key"] = apiKey;
  if (token) headers["authorization"] = `Bearer ${token}`;
  return {
    baseUrl: /^https?:\/\//.test(gateway) ? gateway : `http://${gateway}`,
    question: values.question,
    session: values.session,
    headers,
    maxSteps: wholeNumber("--max-steps", values["max-steps"] ?? "0"),
    tools: values.tools ? values.tools.split(",").map((t) => t.trim()).filter(Boolean) : [],
    timeoutMs: wholeNumber("--timeout-ms", values["timeout-ms"] ?? "120000"),
  };
}

function wholeNumber(flag: string, text: string): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`${flag} must be a whole number, not ${JSON.stringify(text)}`);
  return Number(text);
}

/** gRPC's canonical name of a status code (`InvalidArgument` → `INVALID_ARGUMENT`). */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** Writes notes to stderr, each on a line of its own even when the answer is mid-line. */
class Output {
  private midLine = false;

  text(fragment: string): void {
    process.stdout.write(fragment);
    if (fragment.length > 0) this.midLine = !fragment.endsWith("\n");
  }

  note(line: string): void {
    if (this.midLine) {
      process.stdout.write("\n");
      this.midLine = false;
    }
    process.stderr.write(`${line}\n`);
  }
}

/** Streams one run, printing its events as they arrive; returns its `final` event. */
async function streamRun(transport: Transport, opts: Options, signal: AbortSignal, out: Output): Promise<RunCompleted> {
  const agent = createClient(AgentService, transport);
  const events = agent.run(
    { sessionId: opts.session, input: opts.question, maxSteps: opts.maxSteps, tools: opts.tools },
    { headers: opts.headers, timeoutMs: opts.timeoutMs, signal },
  );
  let deltas = 0;
  for await (const event of events) {
    const e = event.event;
    switch (e.case) {
      case "started":
        out.note(`run ${e.value.runId} started (agent ${e.value.agent}, session ${e.value.sessionId}, request ${e.value.requestId})`);
        break;
      case "memoryLoaded":
        out.note(`memory: ${e.value.messages} messages, ${e.value.tokens} tokens (${e.value.messagesOmitted} left out)`);
        break;
      case "retrieval":
        out.note(`retrieval: ${e.value.chunks.length} chunks` +
          (e.value.chunks.length ? ` (${[...new Set(e.value.chunks.map((c) => c.documentId))].join(", ")})` : ""));
        break;
      case "stepStarted": {
        const s = e.value;
        out.note(`step ${s.step}: ${s.provider}/${s.model}${s.isLlm ? "" : ` (${s.notice || "not a language model"})`}`);
        break;
      }
      case "textDelta":
        deltas += 1;
        out.text(e.value.text);
        break;
      case "toolCall": {
        const call = e.value.toolCall;
        out.note(`tool call ${call?.id}: ${call?.name}(${JSON.stringify(call?.arguments ?? {})})`);
        break;
      }
      case "toolProgress":
        out.note(`tool progress ${e.value.toolCallId}: ${e.value.message}`);
        break;
      case "toolResult": {
        const r = e.value;
        const output = r.output ? toJsonString(ValueSchema, r.output) : "null";
        out.note(`tool result ${r.toolCallId}: ${r.name} -> ${r.isError ? `error: ${r.errorMessage}` : output} (${r.durationMs} ms)`);
        break;
      }
      case "final": {
        const f = e.value;
        const u = f.usage;
        out.note(`final: ${RunStatus[f.status]} after ${f.steps} step(s), ${deltas} text deltas, session version ${f.sessionVersion}`);
        out.note(`usage: ${u?.inputTokens ?? 0} input + ${u?.outputTokens ?? 0} output = ${u?.totalTokens ?? 0} tokens, cost $${f.costUsd.toFixed(6)}`);
        for (const c of f.citations) {
          out.note(`citation [${c.index}] ${c.chunk?.documentId} "${c.chunk?.title}" (${c.chunk?.source})`);
        }
        return f;
      }
      default:
        // Workflow events (agent_started, handoff, interrupt...) are not needed by this example.
        break;
    }
  }
  // Run promises a `final` event or a non-OK status; anything else is a broken stream.
  throw new ConnectError("the run's stream ended without a final event", Code.DataLoss);
}

async function main(): Promise<number> {
  let opts: Options | null;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n${USAGE}\n`);
    return 2;
  }
  if (opts === null) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  // gRPC over HTTP/2 (Connect's gRPC protocol implementation): the same wire format as every
  // other gRPC client, so Envoy routes it like one.
  const transport = createGrpcTransport({ baseUrl: opts.baseUrl });
  const abort = new AbortController();
  process.once("SIGINT", () => abort.abort());
  const out = new Output();
  try {
    const final = await streamRun(transport, opts, abort.signal, out);
    // A unary call: the session as memory now holds it. min_version asks for a read that
    // already reflects this turn (read-your-writes), when the run appended it.
    const memory = createClient(MemoryService, transport);
    const context = await memory.getContext(
      { sessionId: opts.session, minVersion: final.sessionVersion },
      { headers: opts.headers, timeoutMs: 10_000, signal: abort.signal },
    );
    out.note(`session ${opts.session}: version ${context.version}, ${context.messages.length} messages in context, ${context.tokensUsed} tokens`);
    return 0;
  } catch (err) {
    const e = ConnectError.from(err);
    if (abort.signal.aborted) {
      out.note("interrupted: the call was cancelled");
      return 130;
    }
    out.note(`error: ${codeName(e.code)} (${e.code}): ${e.rawMessage}`);
    return 1;
  }
}

process.exitCode = await main();
