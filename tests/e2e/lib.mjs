// Helpers shared by the end-to-end scripts: command-line flags, starting `sparsa serve` on a
// free port, running `sparsa generate`, and checks that collect failures.
import { spawn, execFileSync } from 'node:child_process';

export function flags(argv = process.argv.slice(2)) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    if (!argv[i].startsWith('--')) continue;
    const key = argv[i].slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) out[key] = true;
    else out[key] = argv[++i];
  }
  return out;
}

// Starts `sparsa serve MODEL --port 0 ...` and resolves once it prints the address it listens on.
export function startServer(cli, model, extraArgs = []) {
  const proc = spawn(cli, ['serve', model, '--port', '0', ...extraArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stderr.on('data', (d) => { log += d; });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error(`server did not start:\n${out}${log}`)); }, 60000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/[^\s]+)/);
      if (m) {
        clearTimeout(timer);
        resolve({
          url: m[1],
          proc,
          log: () => log,
          stop: () => new Promise((res) => { proc.once('exit', res); proc.kill('SIGTERM'); }),
        });
      }
    });
    proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited (${code}):\n${out}${log}`)); });
  });
}

// `sparsa generate MODEL -p PROMPT -n N --json` (greedy): the reference continuation.
export function generateReference(cli, model, prompt, maxTokens) {
  const out = execFileSync(cli, ['generate', model, '-p', prompt, '-n', String(maxTokens), '--json', '--threads', '2']);
  return JSON.parse(out.toString());
}

export class Checks {
  constructor() { this.failures = []; this.passed = 0; }
  ok(cond, what, detail = '') {
    if (cond) { this.passed++; console.log(`ok   ${what}`); }
    else { this.failures.push(what); console.log(`FAIL ${what} ${detail}`); }
  }
  eq(got, want, what) {
    this.ok(JSON.stringify(got) === JSON.stringify(want), what,
            `\n  got:  ${JSON.stringify(got)}\n  want: ${JSON.stringify(want)}`);
  }
  finish() {
    console.log(`${this.passed} passed, ${this.failures.length} failed`);
    if (this.failures.length) process.exitCode = 1;
  }
}
