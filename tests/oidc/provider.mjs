// A real OpenID provider (panva/oidc-provider, OpenID certified) on loopback, for tests and `python -m app dev`.
//
// TEST ONLY: devInteractions accepts any login name with any password, state is in memory, and the
// signing key is generated at every start (kid `k-<ms>`), so an API that outlives a restart must refetch JWKS.
//
// Configuration (environment; a JSON file named by OIDC_CONFIG may give the same keys in lower case,
// e.g. {"users": {...}, "clients": {...}, "redirect_uris": [...], "audience": "..."}; env wins over the file):
//   OIDC_HOST            listen address                          default 127.0.0.1
//   OIDC_PORT            listen port                             default 9400
//   OIDC_ISSUER          issuer (compared exactly, no trailing /) default http://127.0.0.1:<port>
//   OIDC_AUDIENCE        `aud` of every access token             default http://127.0.0.1:8000
//   OIDC_RESOURCE        resource indicator (absolute URI)       default OIDC_AUDIENCE, or urn:tlsoverride:api
//                                                                if the audience is not an absolute URI
//   OIDC_ALG             RS256 | ES256                           default RS256
//   OIDC_GROUPS_CLAIM    name of the groups claim                default groups
//   OIDC_API_SCOPES      scopes of the API (resource server)     default "api:read api:write"
//   OIDC_ACCESS_TOKEN_TTL  seconds                               default 3600
//   OIDC_USERS           JSON {"name": ["group", ...]} or {"name": {"groups": [...], "name": "...",
//                        "email": "...", "claims": {...}}}; replaces the default users
//   OIDC_CLIENTS         JSON {"client_id": ["group", ...]} or {"client_id": {"groups": [...],
//                        "secret": "...", "ttl": 2, "claims": {...}}}; replaces the default machine clients.
//                        The secret defaults to "<client_id>-secret".
//   OIDC_SWAGGER_CLIENT_ID   public client (auth code + PKCE)   default swagger-ui
//   OIDC_REDIRECT_URIS   its redirect URIs, JSON list or comma/space separated
//                        default http://127.0.0.1:8000/docs/oauth2-redirect, http://localhost:8000/docs/oauth2-redirect
//   OIDC_EXIT_ON_STDIN_EOF  1: exit when stdin closes (the pytest fixture uses it: no orphan after a killed run)
//
// A login name that is not among the users still logs in (devInteractions), with no groups.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Provider, errors } from 'oidc-provider';

const DEFAULT_USERS = {
  alice: { groups: ['tlso-requesters'], name: 'Alice Requester' },
  bob: { groups: ['tlso-approvers'], name: 'Bob Approver' },
  carol: { groups: ['tlso-approvers'], name: 'Carol Approver' },
  dave: { groups: ['tlso-admins'], name: 'Dave Admin' },
  erin: { groups: ['tlso-auditors'], name: 'Erin Auditor' },
};
const DEFAULT_CLIENTS = {
  'svc-ticketing': { groups: ['tlso-integrations'] },
  'svc-reader': { groups: ['tlso-auditors'] },
  'svc-short': { groups: ['tlso-auditors'], ttl: 2 }, // expiry tests: its tokens live 2 s
};

function fail(message) {
  console.error(`provider.mjs: ${message}`);
  process.exit(2);
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (err) {
    return fail(`${what} is not valid JSON: ${err.message}`);
  }
}

const fileConfig = process.env.OIDC_CONFIG
  ? parseJson(readFileSync(process.env.OIDC_CONFIG, 'utf8'), `OIDC_CONFIG file ${process.env.OIDC_CONFIG}`)
  : {};

function setting(name, fallback) {
  const env = process.env[`OIDC_${name.toUpperCase()}`];
  if (env !== undefined && env !== '') return env;
  if (fileConfig[name] !== undefined) return fileConfig[name];
  return fallback;
}

function jsonSetting(name, fallback) {
  const value = setting(name, fallback);
  return typeof value === 'string' ? parseJson(value, `OIDC_${name.toUpperCase()}`) : value;
}

function listSetting(name, fallback) {
  const value = setting(name, fallback);
  if (Array.isArray(value)) return value;
  const text = String(value).trim();
  if (text.startsWith('[')) return parseJson(text, `OIDC_${name.toUpperCase()}`);
  return text.split(/[\s,]+/).filter(Boolean);
}

function isAbsoluteUri(value) {
  return URL.canParse(value) && !value.includes('#');
}

// {"x": ["g"]} or {"x": {"groups": ["g"], ...}} -> {"x": {"groups": ["g"], ...}}
function normalizeEntities(value, what) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) fail(`${what} must be a JSON object`);
  const out = {};
  for (const [id, entry] of Object.entries(value)) {
    const spec = Array.isArray(entry) ? { groups: entry } : { ...entry };
    spec.groups ??= [];
    if (!Array.isArray(spec.groups)) fail(`${what}.${id}.groups must be a list`);
    if (spec.claims !== undefined && (typeof spec.claims !== 'object' || Array.isArray(spec.claims))) {
      fail(`${what}.${id}.claims must be an object`);
    }
    out[id] = spec;
  }
  return out;
}

const HOST = setting('host', '127.0.0.1');
const PORT = Number(setting('port', 9400));
const ISSUER = setting('issuer', `http://127.0.0.1:${PORT}`);
const AUDIENCE = setting('audience', 'http://127.0.0.1:8000');
const RESOURCE = setting('resource', isAbsoluteUri(AUDIENCE) ? AUDIENCE : 'urn:tlsoverride:api');
const ALG = setting('alg', 'RS256');
const GROUPS_CLAIM = setting('groups_claim', 'groups');
const API_SCOPES = listSetting('api_scopes', 'api:read api:write').join(' ');
const ACCESS_TOKEN_TTL = Number(setting('access_token_ttl', 3600));
const USERS = normalizeEntities(jsonSetting('users', DEFAULT_USERS), 'OIDC_USERS');
const CLIENTS = normalizeEntities(jsonSetting('clients', DEFAULT_CLIENTS), 'OIDC_CLIENTS');
const SWAGGER_CLIENT_ID = setting('swagger_client_id', 'swagger-ui');
const REDIRECT_URIS = listSetting('redirect_uris', [
  'http://127.0.0.1:8000/docs/oauth2-redirect',
  'http://localhost:8000/docs/oauth2-redirect',
]);

if (!Number.isInteger(PORT) || PORT < 1 || PORT > 65535) fail(`OIDC_PORT must be a port number, got ${PORT}`);
if (!['RS256', 'ES256'].includes(ALG)) fail(`OIDC_ALG must be RS256 or ES256, got ${ALG}`);
if (!isAbsoluteUri(RESOURCE)) fail(`OIDC_RESOURCE must be an absolute URI without a fragment, got ${RESOURCE}`);
if (!Number.isInteger(ACCESS_TOKEN_TTL) || ACCESS_TOKEN_TTL < 1) fail('OIDC_ACCESS_TOKEN_TTL must be a positive integer');
if (ISSUER.endsWith('/')) fail(`OIDC_ISSUER must not end with a slash, got ${ISSUER}`);
for (const [id, spec] of Object.entries(CLIENTS)) {
  if (spec.ttl !== undefined && !(Number.isInteger(spec.ttl) && spec.ttl > 0)) fail(`client ${id}: ttl must be a positive integer`);
}

const { privateKey } = ALG === 'ES256'
  ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
  : generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: ALG, kid: `k-${Date.now()}` };

function userClaims(id) {
  const spec = USERS[id] ?? { groups: [] };
  return {
    name: spec.name ?? id,
    preferred_username: id,
    email: spec.email ?? `${id}@example.org`,
    email_verified: true,
    [GROUPS_CLAIM]: spec.groups,
    ...spec.claims,
  };
}

function tokenTtl(client, fallback) {
  return CLIENTS[client?.clientId]?.ttl ?? fallback;
}

const provider = new Provider(ISSUER, {
  jwks: { keys: [signingKey] },
  clientDefaults: { id_token_signed_response_alg: ALG }, // needed when the only key is ES256
  clients: [
    ...Object.entries(CLIENTS).map(([id, spec]) => ({
      client_id: id,
      client_secret: spec.secret ?? `${id}-secret`,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic', // client_secret_post works too
    })),
    {
      client_id: SWAGGER_CLIENT_ID,
      token_endpoint_auth_method: 'none', // public client, PKCE
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: REDIRECT_URIS,
    },
  ],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: [GROUPS_CLAIM],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'], // NOT the API scopes (see oidc.md §7.3)
  async findAccount(ctx, id) {
    return { accountId: id, async claims() { return { sub: id, ...userClaims(id) }; } };
  },
  async extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials') {
      const spec = CLIENTS[token.clientId] ?? { groups: [] };
      return { [GROUPS_CLAIM]: spec.groups, ...spec.claims };
    }
    if (token.accountId) {
      const { email_verified: _unused, ...claims } = userClaims(token.accountId);
      return claims;
    }
    return undefined;
  },
  async loadExistingGrant(ctx) { // dev: auto-consent, no consent screen
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile email groups offline_access');
    grant.addOIDCClaims(['sub', 'name', 'preferred_username', 'email', 'email_verified', GROUPS_CLAIM]);
    grant.addResourceScope(RESOURCE, API_SCOPES);
    await grant.save();
    return grant;
  },
  features: {
    devInteractions: { enabled: true }, // any login, any password
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => (oneOf ? oneOf[0] : RESOURCE),
      useGrantedResource: async () => true, // Swagger UI never sends `resource`
      getResourceServerInfo: async (ctx, resource) => {
        if (resource !== RESOURCE) throw new errors.InvalidTarget();
        return { scope: API_SCOPES, audience: AUDIENCE, accessTokenFormat: 'jwt', jwt: { sign: { alg: ALG } } };
      },
    },
  },
  responseTypes: ['code'],
  pkce: { required: () => true },
  ttl: {
    AccessToken: (ctx, token, client) => tokenTtl(client, ACCESS_TOKEN_TTL),
    ClientCredentials: (ctx, token, client) => tokenTtl(client, ACCESS_TOKEN_TTL),
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: 86400,
    Interaction: 3600,
    Session: 86400,
    Grant: 86400,
    DeviceCode: 600,
    BackchannelAuthenticationRequest: 600,
    PreAuthorizedCode: 600,
  },
});

// oidc-provider's built-in pages (dev login, logout, errors) @import a web font from a public CDN; the tests
// (and a browser driven by them) must reach nothing beyond loopback, so that import is cut from every page.
const WEB_FONT_IMPORT = /@import url\(https:\/\/fonts\.googleapis\.com\/[^)]*\);?/g;
provider.use(async (ctx, next) => {
  await next();
  if (typeof ctx.body === 'string' && ctx.body.includes('fonts.googleapis.com')) {
    ctx.body = ctx.body.replace(WEB_FONT_IMPORT, '');
  }
});

provider.on('server_error', (ctx, err) => console.error('oidc-provider server_error:', err));

const server = provider.listen(PORT, HOST);
server.on('listening', () => {
  console.log(JSON.stringify({
    event: 'listening', issuer: ISSUER, audience: AUDIENCE, resource: RESOURCE, alg: ALG, kid: signingKey.kid,
    users: Object.keys(USERS), clients: Object.keys(CLIENTS), public_client: SWAGGER_CLIENT_ID, redirect_uris: REDIRECT_URIS,
  }));
});
server.on('error', (err) => fail(`cannot listen on ${HOST}:${PORT}: ${err.message}`));

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, shutdown);
// OIDC_EXIT_ON_STDIN_EOF=1: exit when the parent (the pytest fixture) closes our stdin or dies, so that
// a killed test run leaves no provider behind.
if (setting('exit_on_stdin_eof', '') === '1') {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.resume();
}
