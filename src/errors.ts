import { STATUS_CODES } from 'node:http';

/**
 * The few typed errors crm-bridge raises on purpose. Each carries a stable `code` for clients
 * and logs; one error handler (src/plugins/error-handler.ts) turns them into problem+json.
 */
export class AppError extends Error {
  constructor(
    readonly statusCode: number,
    readonly code: string,
    detail: string,
    options?: { cause?: unknown },
  ) {
    super(detail, options);
    this.name = 'AppError';
  }
}

export class UnauthorizedError extends AppError {
  constructor() {
    // One body for every reason (missing, wrong, unknown connection): nothing to probe with.
    super(401, 'UNAUTHORIZED', 'Missing or invalid credentials.');
  }
}

export class BadRequestError extends AppError {
  constructor(detail: string, code = 'BAD_REQUEST') {
    super(400, code, detail);
  }
}

export class UnprocessableError extends AppError {
  constructor(detail: string, code = 'UNPROCESSABLE') {
    super(422, code, detail);
  }
}

export class NotFoundError extends AppError {
  constructor(detail: string) {
    super(404, 'NOT_FOUND', detail);
  }
}

export class ConflictError extends AppError {
  constructor(detail: string, code = 'CONFLICT') {
    super(409, code, detail);
  }
}

/** RFC 9457 problem details. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  instance?: string;
}

export function problem(status: number, code: string, detail: string, instance?: string): Problem {
  return {
    type: 'about:blank',
    title: STATUS_CODES[status] ?? 'Error',
    status,
    detail,
    code,
    ...(instance !== undefined ? { instance } : {}),
  };
}
