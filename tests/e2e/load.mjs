// Load test of `sparsa serve` on loopback with the openai client.
//   --check: 64 concurrent greedy streams all equal each prompt's output alone; then 64 again with
//            16 clients disconnecting midway: the other 48 are unchanged, the 16 sequences are
//            cancelled and every slot is free afterwards.
//   --bench: total tokens/s at 1, 4, 8 and 16 concurrent streams, p50/p99 time to first token
//            and inter-token latency (measured by the client), and the CPU seconds the client
//            and the server process used during each level.
//   --rounds K (bench only): K times as many requests per client at every level (default 1).
//   --client openai|raw (bench only): the openai client, or (default) a light one that reads the
//            same server-sent events over node's http module with a keep-alive agent. Both count
//            the tokens of the usage chunk they received and time each text chunk as it arrives;
//            the light one spends far less CPU per chunk, which matters when it shares the
//            server's cores.
//   --streams 1,8: the concurrency levels to measure (default 1,4,8,16).
//   --no-mmap: start the server with --no-mmap (weights read into huge-page memory).
//   node load.mjs --cli build/release/sparsa --model ../shared/models/small --check --bench
import { readFileSync } from 'node:fs';
import http from 'node:http';
import OpenAI from 'openai';
import { Checks, flags, startServer } from './lib.mjs';

const args = flags();
if (!args.cli || !args.model) { console.error('usage: load.mjs --cli PATH --model DIR [--check] [--bench]'); process.exit(2); }
const NAME = 'm';
const maxSeqs = Number(args['max-seqs'] ?? 16);
const server = await startServer(args.cli, args.model, ['--model-name', NAME, '--max-seqs', String(maxSeqs),
                                                        '--queue', '128', ...(args.threads ? ['--threads', args.threads] : []),
                                                        ...(args['no-mmap'] ? ['--no-mmap'] : [])]);
const client = new OpenAI({ apiKey: 'none', baseURL: `${server.url}/v1`, maxRetries: 0, timeout: 600000 });
const checks = new Checks();
const deadline = Date.now() + Number(args['time-limit-s'] ?? 300) * 1000;

// One streaming request; `abortAfter` chunks of text → the client disconnects.
async function stream(prompt, maxTokens, { abortAfter = Infinity, temperature = 0, seed } = {}) {
  const t0 = performance.now();
  const s = await client.completions.create({ model: NAME, prompt, max_tokens: maxTokens, temperature, seed,
                                              stream: true, stream_options: { include_usage: true } });
  let text = '', chunks = 0, tokens = 0, ttft = null, last = null;
  const gaps = [];
  for await (const chunk of s) {
    if (chunk.usage) tokens = chunk.usage.completion_tokens;
    for (const c of chunk.choices) {
      if (!c.text) continue;
      const now = performance.now();
      if (ttft === null) ttft = now - t0; else gaps.push(now - last);
      last = now;
      text += c.text;
      if (++chunks >= abortAfter) { s.controller.abort(); return { text, aborted: true, ttft, gaps, tokens }; }
    }
  }
  return { text, aborted: false, ttft, gaps, tokens };
}

// The same request as stream() without the openai client: one http.request per stream, the
// events split on blank lines, each `data:` payload parsed once.
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
function streamRaw(prompt, maxTokens, { temperature = 0, seed } = {}) {
  const body = JSON.stringify({ model: NAME, prompt, max_tokens: maxTokens, temperature, seed, stream: true,
                                stream_options: { include_usage: true } });
  const url = new URL(`${server.url}/v1/completions`);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let text = '', tokens = 0, ttft = null, last = null, buf = '', done = false;
    const gaps = [];
    const req = http.request({ host: url.hostname, port: url.port, path: url.pathname, method: 'POST', agent,
                               headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body),
                                          Authorization: 'Bearer none' } }, (res) => {
      if (res.statusCode !== 200) {
        let err = '';
        res.on('data', (d) => { err += d; });
        res.on('end', () => reject(new Error(`HTTP ${res.statusCode}: ${err}`)));
        return;
      }
      res.setEncoding('utf8');
      res.on('data', (d) => {
        buf += d;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const event = buf.slice(0, end);
          buf = buf.slice(end + 2);
          if (!event.startsWith('data: ')) continue;  // a keep-alive comment
          const data = event.slice(6);
          if (data === '[DONE]') { done = true; continue; }
          const chunk = JSON.parse(data);
          if (chunk.error) { reject(new Error(chunk.error.message)); res.destroy(); return; }
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          for (const c of chunk.choices) {
            if (!c.text) continue;
            const now = performance.now();
            if (ttft === null) ttft = now - t0; else gaps.push(now - last);
            last = now;
            text += c.text;
          }
        }
      });
      res.on('end', () => (done ? resolve({ text, aborted: false, ttft, gaps, tokens })
                                : reject(new Error('the stream ended before [DONE]'))));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

// CPU seconds the server process has used so far (all threads; Linux), or NaN.
function serverCpuSeconds() {
  try {
    const fields = readFileSync(`/proc/${server.proc.pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;  // utime + stime, in ticks of 1/100 s
  } catch {
    return NaN;
  }
}

async function metric(name) {
  const body = await (await fetch(`${server.url}/metrics`)).text();
  const m = body.match(new RegExp(`^${name} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : NaN;
}

const prompts = ['The kernel scheduler', 'Memory barriers are', 'def read_file(path):', 'The dictionary defines',
                 'A file system', 'Interrupt handlers', 'import os\n', 'The Python documentation'];
try {
  if (args.check) {
    const N = 48;
    const alone = [];
    for (const p of prompts) alone.push((await stream(p, N)).text);
    const t0 = performance.now();
    const all = await Promise.all(Array.from({ length: 64 }, (_, i) => stream(prompts[i % 8], N)));
    console.log(`64 concurrent streams in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    checks.eq(all.map((r) => r.text), all.map((_, i) => alone[i % 8]), '64 concurrent streams equal each prompt alone');
    const cancelledBefore = await metric('sparsa_sequences_cancelled_total');
    const mixed = await Promise.all(Array.from({ length: 64 }, (_, i) =>
      stream(prompts[i % 8], N, { abortAfter: i % 4 === 1 ? 4 : Infinity }).catch((e) => ({ error: String(e) }))));
    checks.ok(mixed.filter((r) => r.aborted).length === 16, '16 clients disconnected midway');
    checks.eq(mixed.filter((_, i) => i % 4 !== 1).map((r) => r.text), all.filter((_, i) => i % 4 !== 1).map((r) => r.text),
              'the other 48 streams are unchanged');
    let running = NaN;
    for (let i = 0; i < 600 && running !== 0; i++) {
      running = await metric('sparsa_running_sequences');
      if (running !== 0) await new Promise((r) => setTimeout(r, 50));
    }
    checks.eq(running, 0, 'every slot is free after the disconnects');
    checks.eq(await metric('sparsa_sequences_cancelled_total') - cancelledBefore, 16, 'the 16 disconnected sequences were cancelled');
  }
  if (args.bench) {
    const N = Number(args.tokens ?? 64);
    const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : NaN; };
    const rows = [];
    const benchStream = args.client === 'openai' ? stream : streamRaw;
    console.log(`client: ${args.client === 'openai' ? 'openai' : 'raw http'}`);
    // One request first, so that no level pays for connecting and for the first JIT of either side;
    // it also checks that the two clients read the same text and token count.
    const viaRaw = await streamRaw(prompts[0], 24, { temperature: 0.8, seed: 1 });
    const viaOpenai = await stream(prompts[0], 24, { temperature: 0.8, seed: 1 });
    checks.eq([viaRaw.text, viaRaw.tokens], [viaOpenai.text, viaOpenai.tokens], 'both clients read the same stream');
    const levels = args.streams ? String(args.streams).split(',').map(Number) : [1, 4, 8, 16];
    for (const conc of levels) {
      if (Date.now() > deadline) { console.log('time limit reached'); break; }
      const rounds = (conc >= 8 ? 2 : Math.ceil(16 / conc) > 4 ? 4 : Math.ceil(16 / conc)) * Number(args.rounds ?? 1);
      const ttfts = [], gaps = [];
      let tokens = 0;
      const t0 = performance.now();
      const cpu0 = process.cpuUsage(), server0 = serverCpuSeconds();
      // `conc` clients, each sending `rounds` requests one after the other (ignoring EOS is not an
      // API option, so sampled text keeps lengths near N).
      await Promise.all(Array.from({ length: conc }, async (_, k) => {
        for (let r = 0; r < rounds; r++) {
          const res = await benchStream(prompts[(k + r) % 8], N, { temperature: 0.8, seed: k * 100 + r });
          tokens += res.tokens;
          ttfts.push(res.ttft);
          gaps.push(...res.gaps);
        }
      }));
      const secs = (performance.now() - t0) / 1000;
      const cpu = process.cpuUsage(cpu0);
      rows.push({ streams: conc, requests: conc * rounds, tokens, seconds: +secs.toFixed(2),
                  tokens_per_s: +(tokens / secs).toFixed(1),
                  ttft_p50_ms: +pct(ttfts, 0.5).toFixed(1), ttft_p99_ms: +pct(ttfts, 0.99).toFixed(1),
                  itl_p50_ms: +pct(gaps, 0.5).toFixed(1), itl_p99_ms: +pct(gaps, 0.99).toFixed(1),
                  client_cpu_s: +((cpu.user + cpu.system) / 1e6).toFixed(2),
                  server_cpu_s: +(serverCpuSeconds() - server0).toFixed(2) });
      console.log(JSON.stringify(rows.at(-1)));
    }
    console.table(rows);
    const one = rows.find((r) => r.streams === 1), eight = rows.find((r) => r.streams === 8);
    if (one && eight) console.log(`speed-up at 8 streams: ${(eight.tokens_per_s / one.tokens_per_s).toFixed(2)}x`);
  }
} catch (e) {
  checks.ok(false, 'no unexpected exception', `${e.stack ?? e}\n${server.log()}`);
} finally {
  await server.stop();
}
checks.finish();
