// End-to-end test of `sparsa serve` with the official `openai` npm client: completions and chat,
// streaming and not, stop strings, repeatable seeds, the API key, OpenAI-style errors, and greedy
// output equal to `sparsa generate` whether a request runs alone or alongside 7 others.
//   node client.mjs --cli build/release/sparsa --model models/tiny
import OpenAI from 'openai';
import { Checks, flags, generateReference, startServer } from './lib.mjs';

const args = flags();
const cli = args.cli;
const model = args.model;
if (!cli || !model) { console.error('usage: client.mjs --cli PATH --model DIR'); process.exit(2); }
const KEY = 'e2e-test-key';
const NAME = 'tiny';
const checks = new Checks();

const server = await startServer(cli, model, ['--api-key', KEY, '--model-name', NAME, '--max-seqs', '8',
                                              '--queue', '32', '--threads', '2']);
const client = new OpenAI({ apiKey: KEY, baseURL: `${server.url}/v1`, maxRetries: 0, timeout: 120000 });

async function streamText(params, pick) {
  const stream = await params.create({ ...params.body, stream: true });
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      text += pick(c) ?? '';
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { text, finish };
}

try {
  const prompts = ['The kernel scheduler', 'Memory barriers', 'def main():', 'A file system'];
  const N = 24;
  const refs = prompts.map((p) => generateReference(cli, model, p, N));

  // Completions: greedy equals `sparsa generate`; streaming gives the same text.
  const c0 = await client.completions.create({ model: NAME, prompt: prompts[0], max_tokens: N, temperature: 0 });
  checks.eq(c0.choices[0].text, refs[0].text, 'completion (greedy) equals sparsa generate');
  checks.eq(c0.choices[0].finish_reason, refs[0].finish_reason, 'completion finish_reason');
  checks.eq(c0.usage.prompt_tokens, refs[0].prompt_tokens, 'completion usage.prompt_tokens');
  checks.eq(c0.usage.completion_tokens, refs[0].completion_tokens, 'completion usage.completion_tokens');
  const s0 = await streamText({ create: (b) => client.completions.create(b),
                                body: { model: NAME, prompt: prompts[0], max_tokens: N, temperature: 0 } },
                              (c) => c.text);
  checks.eq(s0.text, refs[0].text, 'streamed completion equals sparsa generate');
  checks.eq(s0.finish, refs[0].finish_reason, 'streamed completion finish_reason');

  // Chat, streaming and not.
  const messages = [{ role: 'system', content: 'You answer questions about Linux.' },
                    { role: 'user', content: 'What is a futex?' }];
  const ch = await client.chat.completions.create({ model: NAME, messages, max_tokens: 20, temperature: 0 });
  checks.ok(typeof ch.choices[0].message.content === 'string' && ch.choices[0].message.role === 'assistant',
            'chat completion returns an assistant message');
  checks.ok(['stop', 'length'].includes(ch.choices[0].finish_reason), 'chat finish_reason is stop or length');
  checks.ok(ch.usage.prompt_tokens > 10 && ch.usage.total_tokens === ch.usage.prompt_tokens + ch.usage.completion_tokens,
            'chat usage');
  const chs = await streamText({ create: (b) => client.chat.completions.create(b),
                                 body: { model: NAME, messages, max_tokens: 20, temperature: 0 } },
                               (c) => c.delta?.content);
  checks.eq(chs.text, ch.choices[0].message.content, 'streamed chat equals non-streamed chat');
  checks.eq(chs.finish, ch.choices[0].finish_reason, 'streamed chat finish_reason');

  // Stop strings: the text ends right before the first occurrence.
  const full = refs[0].text;
  const stop = full.slice(10, 14);
  const cut = full.slice(0, full.indexOf(stop));
  const cs = await client.completions.create({ model: NAME, prompt: prompts[0], max_tokens: N, temperature: 0, stop: [stop] });
  checks.eq(cs.choices[0].text, cut, 'stop string cuts the text');
  checks.eq(cs.choices[0].finish_reason, 'stop', 'stop string gives finish_reason stop');
  const css = await streamText({ create: (b) => client.completions.create(b),
                                 body: { model: NAME, prompt: prompts[0], max_tokens: N, temperature: 0, stop } },
                               (c) => c.text);
  checks.eq(css.text, cut, 'stop string cuts the streamed text');

  // Seeds: the same seed repeats, with sampling on.
  const sampled = (seed) => client.completions.create({ model: NAME, prompt: prompts[1], max_tokens: 20,
                                                        temperature: 0.9, top_p: 0.95, seed });
  const [a, b, c2, d] = await Promise.all([sampled(42), sampled(42), sampled(43), sampled(44)]);
  checks.eq(a.choices[0].text, b.choices[0].text, 'the same seed gives the same text');
  checks.ok(a.choices[0].text !== c2.choices[0].text || a.choices[0].text !== d.choices[0].text,
            'other seeds give other text');
  const sc = await streamText({ create: (x) => client.completions.create(x),
                                body: { model: NAME, prompt: prompts[1], max_tokens: 20, temperature: 0.9, top_p: 0.95, seed: 42 } },
                              (x) => x.text);
  checks.eq(sc.text, a.choices[0].text, 'a seeded stream repeats the seeded completion');

  // Greedy alongside 7 other requests (other prompts, sampling, chat) in the same batch.
  const others = [];
  for (let i = 0; i < 7; i++) {
    if (i % 3 === 2) others.push(client.chat.completions.create({ model: NAME, messages, max_tokens: 30, temperature: 0.8, seed: i }));
    else others.push(client.completions.create({ model: NAME, prompt: prompts[(i + 1) % 4] + ' and', max_tokens: 30, temperature: 0.7, seed: i }));
  }
  const together = await Promise.all([
    client.completions.create({ model: NAME, prompt: prompts[0], max_tokens: N, temperature: 0 }), ...others]);
  checks.eq(together[0].choices[0].text, refs[0].text, 'greedy alongside 7 others equals sparsa generate');
  // Every prompt greedy at once, 2 streams and 2 plain requests each.
  const all = await Promise.all(prompts.flatMap((p) => [
    client.completions.create({ model: NAME, prompt: p, max_tokens: N, temperature: 0 }).then((r) => r.choices[0].text),
    client.completions.create({ model: NAME, prompt: p, max_tokens: N, temperature: 0 }).then((r) => r.choices[0].text),
    streamText({ create: (x) => client.completions.create(x), body: { model: NAME, prompt: p, max_tokens: N, temperature: 0 } }, (x) => x.text).then((r) => r.text),
    streamText({ create: (x) => client.completions.create(x), body: { model: NAME, prompt: p, max_tokens: N, temperature: 0 } }, (x) => x.text).then((r) => r.text),
  ]));
  checks.eq(all, prompts.flatMap((p, i) => [refs[i].text, refs[i].text, refs[i].text, refs[i].text]),
            '16 concurrent greedy requests (4 prompts) equal sparsa generate');

  // The API key is enforced.
  const wrong = new OpenAI({ apiKey: 'wrong', baseURL: `${server.url}/v1`, maxRetries: 0 });
  try {
    await wrong.completions.create({ model: NAME, prompt: 'x', max_tokens: 2 });
    checks.ok(false, 'a wrong API key is refused');
  } catch (e) {
    checks.ok(e instanceof OpenAI.AuthenticationError && e.status === 401, 'a wrong API key is refused with 401', String(e));
  }
  try {
    await wrong.models.list();
    checks.ok(false, 'a wrong API key is refused on /v1/models');
  } catch (e) {
    checks.eq(e.status, 401, 'a wrong API key is refused on /v1/models');
  }
  const health = await fetch(`${server.url}/health`);
  checks.eq(health.status, 200, '/health needs no key');
  const models = await client.models.list();
  checks.eq(models.data.map((m) => m.id), [NAME], '/v1/models lists the model');

  // OpenAI-style errors reach the client as its error classes.
  for (const [what, body, status, text] of [
    ['negative max_tokens', { model: NAME, prompt: 'x', max_tokens: -1 }, 400, 'max_tokens'],
    ['unknown model', { model: 'gpt-nothing', prompt: 'x' }, 404, 'does not exist'],
    ['temperature out of range', { model: NAME, prompt: 'x', temperature: 9 }, 400, 'temperature'],
  ]) {
    try {
      await client.completions.create(body);
      checks.ok(false, `${what} is refused`);
    } catch (e) {
      checks.ok(e.status === status && String(e.message).includes(text), `${what} is refused with ${status}`, String(e));
    }
  }
} catch (e) {
  checks.ok(false, 'no unexpected exception', `${e.stack ?? e}\n${server.log()}`);
} finally {
  await server.stop();
}
checks.finish();
