/**
 * Text from outside (a pipeline's error answer, a CRM's record id) made safe to print to an
 * operator's terminal: control characters, ANSI escape sequences among them, are shown as
 * `\u{1b}` instead of being obeyed (a title rewritten, the screen cleared, a line hidden). The
 * CLI's tables print what they show through it.
 */
export function printable(text: string): string {
  // C0 and C1 controls and DEL; tabs and line breaks too, so one value stays on its line.
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\u{${c.charCodeAt(0).toString(16)}}`);
}
