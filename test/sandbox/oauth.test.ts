import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CLIENT, form, startHarness, readJson } from './helpers.js';
import type { Harness } from './helpers.js';

const REDIRECT = 'http://127.0.0.1:9/callback';

describe('sandbox OAuth2', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ records: 10 });
  });
  beforeEach(() => {
    h.sb.state.resetSwitches();
  });
  afterAll(() => h.sb.close());

  const token = (body: Record<string, string>) => fetch(`${h.sb.url}/oauth/token`, form(body));
  const authorizeUrl = (state = 'xyz') =>
    `${h.sb.url}/oauth/authorize?response_type=code&client_id=sandbox-client&redirect_uri=${encodeURIComponent(REDIRECT)}&state=${state}`;

  async function codeByConsent(): Promise<string> {
    const page = await fetch(authorizeUrl());
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/text\/html/);
    expect(await page.text()).toContain('Allow access');
    const approve = await fetch(`${h.sb.url}/oauth/authorize`, {
      ...form({ client_id: 'sandbox-client', redirect_uri: REDIRECT, state: 'xyz', response_type: 'code', decision: 'approve' }),
      redirect: 'manual',
    });
    expect(approve.status).toBe(302);
    const location = new URL(approve.headers.get('location') ?? '');
    expect(location.searchParams.get('state')).toBe('xyz');
    return location.searchParams.get('code') ?? '';
  }

  it('runs the authorization-code flow through the consent page', async () => {
    const code = await codeByConsent();
    const res = await token({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT, ...CLIENT });
    expect(res.status).toBe(200);
    const body = await readJson(res);
    expect(body).toMatchObject({ token_type: 'bearer', expires_in: 604800 });
    expect(typeof body.refresh_token).toBe('string');
    expect((await h.api('/api/v4/matters.json', { token: body.access_token })).status).toBe(200);
    const reuse = await token({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT, ...CLIENT });
    expect(reuse.status).toBe(400);
    expect((await readJson(reuse)).error).toBe('invalid_grant');
  });

  it('redirects immediately with autoApprove, and with access_denied on deny', async () => {
    h.sb.state.setSwitches({ autoApprove: true });
    const res = await fetch(authorizeUrl('s1'), { redirect: 'manual' });
    expect(res.status).toBe(302);
    const loc = new URL(res.headers.get('location') ?? '');
    expect(loc.origin + loc.pathname).toBe(REDIRECT);
    expect(loc.searchParams.get('code')).toBeTruthy();
    expect(loc.searchParams.get('state')).toBe('s1');
    const deny = await fetch(`${h.sb.url}/oauth/authorize`, { ...form({ client_id: 'sandbox-client', redirect_uri: REDIRECT, state: 's2', decision: 'deny' }), redirect: 'manual' });
    expect(new URL(deny.headers.get('location') ?? '').searchParams.get('error')).toBe('access_denied');
  });

  it('answers RFC 6749 errors: invalid_client, unsupported_grant_type, invalid_grant', async () => {
    const bad = await token({ grant_type: 'client_credentials', client_id: 'sandbox-client', client_secret: 'wrong' });
    expect(bad.status).toBe(401);
    expect((await readJson(bad)).error).toBe('invalid_client');
    const unsupported = await token({ grant_type: 'password', ...CLIENT });
    expect(unsupported.status).toBe(400);
    expect((await readJson(unsupported)).error).toBe('unsupported_grant_type');
    const grant = await token({ grant_type: 'refresh_token', refresh_token: 'nope', ...CLIENT });
    expect((await readJson(grant)).error).toBe('invalid_grant');
  });

  it('issues client_credentials tokens without a refresh token, also with HTTP Basic', async () => {
    const res = await fetch(`${h.sb.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: `Basic ${Buffer.from('sandbox-client:sandbox-secret').toString('base64')}` },
      body: 'grant_type=client_credentials',
    });
    const body = await readJson(res);
    expect(res.status).toBe(200);
    expect(body.refresh_token).toBeUndefined();
    expect((await h.api('/api/v4/contacts.json', { token: body.access_token })).status).toBe(200);
  });

  it('answers 401 invalid_token for a missing or unknown token', async () => {
    for (const t of [null, 'not-a-token']) {
      const res = await h.api('/api/v4/matters.json', { token: t });
      expect(res.status).toBe(401);
      expect(await readJson(res)).toEqual({ error: 'invalid_token' });
    }
  });

  it('tokenRealLifetimeSeconds: tokens die long before the advertised expires_in', async () => {
    h.sb.state.setSwitches({ tokenRealLifetimeSeconds: 60 });
    const issued = await readJson(await token({ grant_type: 'client_credentials', ...CLIENT }));
    expect(issued.expires_in).toBe(604800);
    expect((await h.api('/api/v4/matters.json', { token: issued.access_token })).status).toBe(200);
    h.sb.state.setClock({ advanceSeconds: 61 });
    const res = await h.api('/api/v4/matters.json', { token: issued.access_token });
    expect(res.status).toBe(401);
    expect(await readJson(res)).toEqual({ error: 'invalid_token' });
  });

  it('without rotation, refresh returns a new access token and the refresh token keeps working', async () => {
    const grant = h.sb.state.issueToken();
    for (let i = 0; i < 2; i++) {
      const res = await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT });
      const body = await readJson(res);
      expect(res.status).toBe(200);
      expect(body.refresh_token).toBeUndefined();
    }
  });

  it('rotateRefreshTokens: each refresh rotates; reusing a rotated token revokes the whole grant', async () => {
    h.sb.state.setSwitches({ rotateRefreshTokens: true });
    const grant = h.sb.state.issueToken();
    const first = await readJson(await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT }));
    expect(first.refresh_token).toBeTruthy();
    expect(first.refresh_token).not.toBe(grant.refresh_token);
    expect((await h.api('/api/v4/matters.json', { token: first.access_token })).status).toBe(200);

    const reuse = await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT });
    expect(reuse.status).toBe(400);
    expect((await readJson(reuse)).error).toBe('invalid_grant');
    // The whole grant is gone: the new access token and the new refresh token too.
    expect((await h.api('/api/v4/matters.json', { token: first.access_token })).status).toBe(401);
    const newer = await token({ grant_type: 'refresh_token', refresh_token: first.refresh_token, ...CLIENT });
    expect((await readJson(newer)).error).toBe('invalid_grant');
    const g = h.sb.state.oauth.grants.get(grant.grant_id);
    expect(g?.revokedReason).toMatch(/reused/);
  });

  it('revokeAll: every refresh answers invalid_grant', async () => {
    const grant = h.sb.state.issueToken();
    h.sb.state.setSwitches({ revokeAll: true });
    const res = await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT });
    expect(res.status).toBe(400);
    expect((await readJson(res)).error).toBe('invalid_grant');
    h.sb.state.setSwitches({ revokeAll: false });
    expect((await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT })).status).toBe(200);
  });

  it('control API revokes a grant and expires access tokens', async () => {
    const grant = h.sb.state.issueToken();
    const exp = await readJson(await fetch(`${h.sb.url}/_sandbox/tokens/expire`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ grantId: grant.grant_id }) }));
    expect(exp.expired).toBe(1);
    expect((await h.api('/api/v4/matters.json', { token: grant.access_token })).status).toBe(401);
    const refreshed = await readJson(await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT }));
    expect((await h.api('/api/v4/matters.json', { token: refreshed.access_token })).status).toBe(200);
    await fetch(`${h.sb.url}/_sandbox/tokens/revoke`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ grantId: grant.grant_id }) });
    expect((await h.api('/api/v4/matters.json', { token: refreshed.access_token })).status).toBe(401);
    expect((await readJson(await token({ grant_type: 'refresh_token', refresh_token: grant.refresh_token ?? '', ...CLIENT }))).error).toBe('invalid_grant');
  });

  it('logs token-endpoint calls by grant and token id, never the token string', async () => {
    const since = h.sb.state.requestLog.lastSeq;
    const issued = await readJson(await token({ grant_type: 'client_credentials', ...CLIENT }));
    await h.api('/api/v4/matters.json', { token: issued.access_token });
    const log = await readJson(await fetch(`${h.sb.url}/_sandbox/requests?since=${since}`));
    expect(log.requests.map((r: any) => r.path)).toEqual(['/oauth/token', '/api/v4/matters.json']);
    expect(log.requests[0].auth).toMatchObject({ scheme: 'client', clientId: 'sandbox-client', grantType: 'client_credentials' });
    expect(log.requests[1].auth).toMatchObject({ scheme: 'bearer', state: 'valid' });
    expect(log.requests[1].auth.tokenId).toMatch(/^at-/);
    expect(JSON.stringify(log)).not.toContain(issued.access_token);
  });
});
