import { z } from 'zod';

// One schema is both the PATCH validator and the type, so the control API and the state can
// never disagree about what a switch is called or what it accepts.
const rate = z.number().min(0).max(1);

export const sandboxSwitchesSchema = z.object({
  /** Access tokens really die after this many seconds, whatever `expires_in` claimed. null = honest. */
  tokenRealLifetimeSeconds: z.number().int().positive().nullable(),
  /** What the token endpoint advertises as `expires_in` (Clio's docs say 7 days in one place). */
  advertisedExpiresInSeconds: z.number().int().positive(),
  /** Each refresh issues a new refresh token; reusing a rotated one revokes the whole grant. */
  rotateRefreshTokens: z.boolean(),
  /** Every refresh_token grant answers invalid_grant, as after an admin revoked the app. */
  revokeAll: z.boolean(),
  /** The documented host (`/documented/...`) answers with an HTML error page instead of the API. */
  documentedHostBroken: z.boolean(),
  /** Clio documents `updated_since` both ways; true = `>=` (the honest default), false = `>`. */
  updatedSinceInclusive: z.boolean(),
  /** Stamp and report timestamps truncated to whole seconds, so many writes share one. */
  oneSecondTimestamps: z.boolean(),
  /** The sandbox's clock runs this far ahead (positive) or behind (negative) the caller's. */
  clockSkewSeconds: z.number(),
  /** N requests per window per token; null = unlimited. Clio's peak limit is 50 per 60 s. */
  rateLimit: z.object({ limit: z.number().int().positive(), windowSeconds: z.number().positive() }).nullable(),
  /** Fraction of API calls answered with a 5xx. */
  errorRate: rate,
  /** Fraction of API calls whose socket is destroyed without an answer. */
  resetRate: rate,
  /** Added before every API answer. */
  latencyMs: z.number().int().min(0),
  /** The last record of each page comes back again as the first of the next page. */
  repeatAtPageBoundary: z.boolean(),
  /** Defaults for automation rules that do not set their own. */
  automationDropRate: rate,
  automationDuplicateRate: rate,
  automationDelayMs: z.number().int().min(0),
  /** GET /oauth/authorize redirects straight back with a code instead of showing the consent page. */
  autoApprove: z.boolean(),
  /** HubSpot dialect: search requests per second per token; the live limit is about 4, so that is
   * the default (the dialect's documented behaviour, not a lie). null = unlimited. */
  hubspotSearchPerSecond: z.number().positive().nullable(),
});

export type SandboxSwitches = z.infer<typeof sandboxSwitchesSchema>;

export const switchesPatchSchema = sandboxSwitchesSchema.partial().strict();
export type SwitchesPatch = z.infer<typeof switchesPatchSchema>;

export function defaultSwitches(): SandboxSwitches {
  return {
    tokenRealLifetimeSeconds: null,
    advertisedExpiresInSeconds: 604_800,
    rotateRefreshTokens: false,
    revokeAll: false,
    documentedHostBroken: false,
    updatedSinceInclusive: true,
    oneSecondTimestamps: false,
    clockSkewSeconds: 0,
    rateLimit: null,
    errorRate: 0,
    resetRate: 0,
    latencyMs: 0,
    repeatAtPageBoundary: false,
    automationDropRate: 0,
    automationDuplicateRate: 0,
    automationDelayMs: 0,
    autoApprove: false,
    hubspotSearchPerSecond: 4,
  };
}

/** Applies a validated patch; keys given as undefined leave the current value alone. */
export function applySwitchesPatch(current: SandboxSwitches, patch: unknown): SandboxSwitches {
  const parsed = switchesPatchSchema.parse(patch);
  const next: Record<string, unknown> = { ...current };
  for (const [k, v] of Object.entries(parsed)) if (v !== undefined) next[k] = v;
  return sandboxSwitchesSchema.parse(next);
}
