#!/usr/bin/env node
'use strict';

// Prints a markdown summary of http-cache-tests results (the JSON that run.sh
// writes, the format of the suite's own results/*.json): how many tests of
// each outcome, per area of the suite (its test suites: "Cache-Control
// Freshness", "Vary and Cache Keys", ...) and in total. Plain Node, no
// dependencies; it reads the test definitions from the installed suite
// (node_modules/http-cache-tests) to know each test's area, kind and
// dependencies, and classifies results exactly as the suite's
// lib/display.mjs determineTestResult() does (the cache-tests.fyi symbols).
//
//   node summary.js [options] [NAME=]RESULTS.json [...]
//
//   NAME=            column name (default: the file name without .json)
//   --published L    add columns for results shipped with the suite, from
//                    node_modules/http-cache-tests/results/ (L: comma-separated
//                    file names without .json, e.g. nginx,varnish; or "all")
//   --list-published list the shipped results (name, type, version) and exit
//   --failures       list, for the first column, every test that did not pass
//                    (fail, optional fail, setup, harness, retry, dependency)
//   --diff           list the tests whose outcome in the first column differs
//                    from any other column
//
// Example: node summary.js bext=out/bext.json --published nginx,varnish

const fs = require('fs');
const path = require('path');

const SUITE = path.join(__dirname, 'node_modules', 'http-cache-tests');

// As in lib/display.mjs (resultTypes), in display order.
const OUTCOMES = [
  ['pass', '✅', 'pass'],
  ['fail', '⛔️', 'fail'],
  ['optional_fail', '⚠️', 'optional fail'],
  ['yes', 'Y', 'check: yes'],
  ['no', 'N', 'check: no'],
  ['setup_fail', '🔹', 'setup fail'],
  ['harness_fail', '⁉️', 'harness fail'],
  ['dependency_fail', '⚪️', 'dependency fail'],
  ['retry', '↻', 'retry'],
  ['untested', '-', 'not tested'],
];
const PASS_TYPES = new Set(['pass', 'yes']);

function usage(message) {
  if (message) console.error(`summary.js: ${message}`);
  console.error('usage: node summary.js [--published nginx,varnish|all] [--list-published] [--failures] [--diff] [NAME=]RESULTS.json ...');
  process.exit(2);
}

async function loadSuite() {
  if (!fs.existsSync(path.join(SUITE, 'tests', 'index.mjs'))) {
    console.error(`summary.js: http-cache-tests is not installed in ${SUITE}; run setup.sh`);
    process.exit(1);
  }
  const url = (p) => 'file://' + path.join(SUITE, p);
  const suites = (await import(url('tests/index.mjs'))).default.slice();
  // cli.mjs adds this one to the list it runs.
  suites.push((await import(url('tests/surrogate-control.mjs'))).default);
  const pkg = JSON.parse(fs.readFileSync(path.join(SUITE, 'package.json'), 'utf8'));
  return { suites, version: pkg.version };
}

async function loadPublishedIndex() {
  return (await import('file://' + path.join(SUITE, 'results', 'index.mjs'))).default;
}

// lib/display.mjs determineTestResult(), kept faithful (including its quirks:
// any error other than a Setup error counts as a plain failure of the test's
// kind; "harness fail" is effectively never produced).
function classify(tests, id, results, honorDependencies = true) {
  const test = tests.get(id);
  const result = results[id];
  if (result === undefined) return 'untested';
  if (honorDependencies && test.depends_on !== undefined) {
    for (const dep of test.depends_on) {
      if (!PASS_TYPES.has(classify(tests, dep, results))) return 'dependency_fail';
    }
  }
  if (result[0] === 'Setup') return result[1] === 'retry' ? 'retry' : 'setup_fail';
  if (result === false) return 'harness_fail';
  const kind = test.kind || 'required';
  if (kind === 'required') return result === true ? 'pass' : 'fail';
  if (kind === 'optimal') return result === true ? 'pass' : 'optional_fail';
  if (kind === 'check') return result === true ? 'yes' : 'no';
  throw new Error(`unknown test kind ${kind} for ${id}`);
}

function emptyCounts() {
  return Object.fromEntries(OUTCOMES.map(([k]) => [k, 0]));
}

function summarise(suites, tests, column) {
  const perSuite = new Map();
  const total = emptyCounts();
  const outcome = new Map();
  const errorNames = {};
  for (const suite of suites) {
    const counts = emptyCounts();
    for (const test of suite.tests) {
      if (test.browser_only === true) continue; // not run against proxies
      const o = classify(tests, test.id, column.results);
      outcome.set(test.id, o);
      counts[o]++;
      total[o]++;
      const r = column.results[test.id];
      if (Array.isArray(r) && r[0] !== 'Assertion' && r[0] !== 'Setup') {
        errorNames[r[0]] = (errorNames[r[0]] || 0) + 1;
      }
    }
    perSuite.set(suite.id, counts);
  }
  const unknown = Object.keys(column.results).filter((id) => !tests.has(id));
  return { perSuite, total, outcome, errorNames, unknown };
}

function cell(counts) {
  const parts = OUTCOMES.filter(([k]) => counts[k] > 0).map(([k, sym]) => `${sym} ${counts[k]}`);
  return parts.join(' ') || '–';
}

function sum(counts) {
  return Object.values(counts).reduce((a, b) => a + b, 0);
}

function table(header, rows) {
  const out = [`| ${header.join(' | ')} |`, `|${header.map((_, i) => (i === 0 ? ' --- ' : ' ---: ')).join('|')}|`];
  for (const row of rows) out.push(`| ${row.join(' | ')} |`);
  return out.join('\n');
}

function message(result) {
  if (!Array.isArray(result)) return '';
  return `${result[0]}: ${String(result[1]).replace(/\s+/g, ' ').replace(/\|/g, '\\|')}`;
}

async function main() {
  const args = process.argv.slice(2);
  const columns = [];
  let published = [];
  let listPublished = false;
  let failures = false;
  let diff = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--published') {
      if (i + 1 >= args.length) usage('--published needs a list');
      published = args[++i].split(',').map((s) => s.trim()).filter(Boolean);
    } else if (a.startsWith('--published=')) {
      published = a.slice('--published='.length).split(',').map((s) => s.trim()).filter(Boolean);
    } else if (a === '--list-published') {
      listPublished = true;
    } else if (a === '--failures') {
      failures = true;
    } else if (a === '--diff') {
      diff = true;
    } else if (a === '-h' || a === '--help') {
      usage();
    } else if (a.startsWith('--')) {
      usage(`unknown option ${a}`);
    } else {
      const eq = a.indexOf('=');
      const file = eq > 0 ? a.slice(eq + 1) : a;
      const name = eq > 0 ? a.slice(0, eq) : path.basename(file).replace(/\.json$/, '');
      let results;
      try {
        results = JSON.parse(fs.readFileSync(file, 'utf8'));
      } catch (e) {
        console.error(`summary.js: cannot read ${file}: ${e.message}`);
        process.exit(1);
      }
      columns.push({ name, file, results });
    }
  }

  const { suites, version } = await loadSuite();
  const index = await loadPublishedIndex();

  if (listPublished) {
    console.log(table(['file', 'name', 'type', 'version'],
      index.map((e) => [e.file.replace(/\.json$/, ''), e.name, e.type, e.version])));
    return;
  }

  const notes = [];
  const wanted = published.includes('all') ? index.map((e) => e.file.replace(/\.json$/, '')) : published;
  for (const stem of wanted) {
    const entry = index.find((e) => e.file === `${stem}.json` || e.name.toLowerCase() === stem.toLowerCase());
    if (!entry) usage(`no published results named ${stem} (see --list-published)`);
    const results = JSON.parse(fs.readFileSync(path.join(SUITE, 'results', entry.file), 'utf8'));
    columns.push({ name: `${entry.name}*`, file: `results/${entry.file}`, results });
    notes.push(`\\* ${entry.name}: published results shipped with http-cache-tests ${version} (node_modules/http-cache-tests/results/${entry.file}), ${entry.type} version ${entry.version}.`);
  }
  if (columns.length === 0) usage('no results given');

  const tests = new Map();
  for (const suite of suites) for (const test of suite.tests) tests.set(test.id, test);
  for (const c of columns) c.summary = summarise(suites, tests, c);

  const out = [];
  out.push(`## http-cache-tests ${version}: ${columns.map((c) => c.name).join(', ')}`);
  out.push('');
  const legend = OUTCOMES.map(([, sym, label]) => `${sym} ${label}`).join(' · ');

  if (columns.length === 1) {
    const s = columns[0].summary;
    const header = ['Area', 'tests', ...OUTCOMES.map(([, sym, label]) => `${sym} ${label}`)];
    const rows = suites.map((suite) => {
      const c = s.perSuite.get(suite.id);
      return [suite.name, sum(c), ...OUTCOMES.map(([k]) => c[k])];
    });
    rows.push(['**Total**', `**${sum(s.total)}**`, ...OUTCOMES.map(([k]) => `**${s.total[k]}**`)]);
    out.push(table(header, rows));
  } else {
    const header = ['Area', 'tests', ...columns.map((c) => c.name)];
    const rows = suites.map((suite) => [
      suite.name,
      sum(columns[0].summary.perSuite.get(suite.id)),
      ...columns.map((c) => cell(c.summary.perSuite.get(suite.id))),
    ]);
    rows.push(['**Total**', `**${sum(columns[0].summary.total)}**`, ...columns.map((c) => `**${cell(c.summary.total)}**`)]);
    out.push(table(header, rows));
    out.push('');
    out.push(legend);
    out.push('');
    out.push('### Totals');
    out.push('');
    out.push(table(['Outcome', ...columns.map((c) => c.name)],
      OUTCOMES.map(([k, sym, label]) => [`${sym} ${label}`, ...columns.map((c) => c.summary.total[k])])));
  }

  const extra = [];
  for (const c of columns) {
    const names = Object.entries(c.summary.errorNames);
    if (names.length) {
      extra.push(`- ${c.name}: ${names.reduce((a, [, n]) => a + n, 0)} results are errors other than assertion or setup failures (${names.map(([n, k]) => `${n} ${k}`).join(', ')}); the suite counts them as failures of the test's kind.`);
    }
    if (c.summary.unknown.length) {
      extra.push(`- ${c.name}: ${c.summary.unknown.length} result ids are not tests of this suite version (ignored): ${c.summary.unknown.slice(0, 5).join(', ')}${c.summary.unknown.length > 5 ? ', …' : ''}`);
    }
  }
  if (extra.length || notes.length) {
    out.push('');
    out.push(...notes.map((n) => `${n}  `));
    out.push(...extra);
  }
  out.push('');
  out.push(`Tests counted: the suite's ${tests.size} tests less the browser-only ones, which its CLI does not run against proxies. ` +
    'Outcomes are classified as cache-tests.fyi does (lib/display.mjs determineTestResult), honouring test dependencies.');

  if (failures) {
    const c = columns[0];
    out.push('');
    out.push(`### ${c.name}: tests that did not pass`);
    out.push('');
    const rows = [];
    for (const suite of suites) {
      for (const test of suite.tests) {
        const o = c.summary.outcome.get(test.id);
        if (o === undefined || PASS_TYPES.has(o) || o === 'no') continue;
        rows.push([`\`${test.id}\``, suite.name, OUTCOMES.find(([k]) => k === o)[2], message(c.results[test.id])]);
      }
    }
    out.push(rows.length ? table(['Test', 'Area', 'Outcome', 'Detail'], rows) : 'None.');
  }

  if (diff && columns.length > 1) {
    const [first, ...others] = columns;
    out.push('');
    out.push(`### Tests whose outcome differs between ${first.name} and ${others.map((c) => c.name).join(', ')}`);
    out.push('');
    const rows = [];
    for (const suite of suites) {
      for (const test of suite.tests) {
        if (test.browser_only === true) continue;
        const mine = first.summary.outcome.get(test.id);
        if (others.every((c) => c.summary.outcome.get(test.id) === mine)) continue;
        const sym = (o) => OUTCOMES.find(([k]) => k === o)[1];
        rows.push([`\`${test.id}\``, suite.name, ...columns.map((c) => sym(c.summary.outcome.get(test.id))), message(first.results[test.id])]);
      }
    }
    out.push(rows.length ? table(['Test', 'Area', ...columns.map((c) => c.name), `${first.name} detail`], rows) : 'None.');
  }

  console.log(out.join('\n'));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
