import type { z } from 'zod';
import type { connectorDefinitionSchema } from '../../config/schema.js';
import { clio } from './clio.js';
import { hubspot } from './hubspot.js';

export type ConnectorDefinitionInput = z.input<typeof connectorDefinitionSchema>;

/**
 * Named connector definitions a connections file can refer to (`connector: clio`). They are
 * plain data, validated by the same schema as an inline definition.
 */
export const presets: Record<string, ConnectorDefinitionInput> = { clio, hubspot };
