#!/usr/bin/env node
// For gate vendors: verify a signed change event or deny-list page with the public key
// alone, with Node's built-in crypto (Ed25519; Node 16 or later). The same as gate_verify.py:
//
//   node gate_verify.js event|page --public-key HEX [--public-key HEX ...] FILE.json
//
// The JSON: protobuf's JSON mapping, proto field names, enums as numbers (64-bit integers as
// strings, bytes in base64, default values may be absent). Exit 0 "verified", or 1 "REFUSED".
// What is signed: docs/DECISIONS.md, "A deny list gates can trust offline".
'use strict';
const crypto = require('crypto');
const fs = require('fs');

const EVENT_FIELDS = ['sequence', 'card_number', 'state', 'time', 'state_changed',
  'locks_changed', 'functions_changed', 'replacement_changed', 'balance_changed',
  'transit_reason', 'transit_reason_until', 'validity_changed', 'points_changed'];
const PAGE_FIELDS = ['sequence', 'time', 'after_card_number', 'through_card_number', 'complete'];
const TEXT = new Set(['card_number', 'after_card_number', 'through_card_number']);
const BOOL = new Set(['state_changed', 'locks_changed', 'functions_changed',
  'replacement_changed', 'balance_changed', 'validity_changed', 'points_changed', 'complete']);

function value(m, name) {
  const v = m[name];
  if (TEXT.has(name)) return v || '';
  if (BOOL.has(name)) {
    if (v !== undefined && v !== true && v !== false) throw new Error(`${name} is not a boolean`);
    return v ? '1' : '0';
  }
  if (v === undefined || v === null) return '0';
  if (!/^-?\d+$/.test(String(v))) throw new Error(`${name} is not an integer`);
  return BigInt(v).toString(); // 64-bit integers arrive as strings
}

const keyId = (raw) => crypto.createHash('sha256').update(raw).digest().subarray(0, 8)
  .toString('hex');

function eventBytes(e) {
  const lines = ['yikatong.v1.ChangeEvent', `key_id=${e.key_id || ''}`];
  for (const n of EVENT_FIELDS) lines.push(`${n}=${value(e, n)}`);
  return Buffer.from(lines.join('\n') + '\n', 'utf8');
}

function pageBytes(p) {
  const entries = p.entries || [];
  const h = crypto.createHash('sha256');
  for (const e of entries) {
    h.update(`${value(e, 'card_number')},${value(e, 'reason')},${value(e, 'until')}\n`, 'utf8');
  }
  const digest = h.digest();
  if (!digest.equals(Buffer.from(p.entries_sha256 || '', 'base64'))) {
    throw new Error('the entries do not match entries_sha256');
  }
  const lines = ['yikatong.v1.GetDenyListResponse', `key_id=${p.key_id || ''}`];
  for (const n of PAGE_FIELDS) lines.push(`${n}=${value(p, n)}`);
  lines.push(`entries=${entries.length}`, `entries_sha256=${digest.toString('hex')}`);
  return Buffer.from(lines.join('\n') + '\n', 'utf8');
}

function publicKey(raw) {
  return crypto.createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' });
}

function verify(kind, message, rawKeys) {
  const keys = new Map(rawKeys.map((k) => [keyId(k), k]));
  const kid = message.key_id || '';
  if (!keys.has(kid)) throw new Error(`signed by key ${kid || '(none)'}, not one given`);
  const data = kind === 'event' ? eventBytes(message) : pageBytes(message);
  const signature = Buffer.from(message.signature || '', 'base64');
  if (!crypto.verify(null, data, publicKey(keys.get(kid)), signature)) {
    throw new Error('the signature does not match');
  }
}

function main(argv) {
  const keys = [];
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--public-key') keys.push(Buffer.from(argv[++i] || '', 'hex'));
    else rest.push(argv[i]);
  }
  const [kind, file] = rest;
  if (!['event', 'page'].includes(kind) || !file || keys.length === 0) {
    console.error('usage: gate_verify.js event|page --public-key HEX [...] FILE.json');
    return 2;
  }
  try {
    verify(kind, JSON.parse(fs.readFileSync(file, 'utf8')), keys);
  } catch (error) {
    console.log(`REFUSED: ${error.message}`);
    return 1;
  }
  console.log('verified');
  return 0;
}

process.exitCode = main(process.argv.slice(2));
