#include "names.hpp"

#include <cstdint>
#include <cstdio>

namespace decomcam {
namespace {

// One UTF-8 sequence at s[i]: its code point and length, or length 0 when the bytes are not UTF-8.
int decode(const std::string& s, size_t i, uint32_t* cp) {
  const uint8_t b = uint8_t(s[i]);
  int n = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xe ? 3 : (b >> 3) == 0x1e ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  uint32_t c = n == 1 ? b : n == 2 ? (b & 0x1f) : n == 3 ? (b & 0x0f) : (b & 0x07);
  for (int k = 1; k < n; ++k) {
    const uint8_t t = uint8_t(s[i + k]);
    if ((t >> 6) != 0x2) return 0;
    c = (c << 6) | (t & 0x3f);
  }
  static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (c < least[n] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;  // overlong, out of range
  *cp = c;
  return n;
}

// Control, format, line/paragraph separator: what is shown escaped (Unicode Cc, Cf and Zl/Zp, the ones that
// occur in names).
bool needs_escape(uint32_t c) {
  return c < 0x20 || (c >= 0x7f && c < 0xa0) || c == 0xad || (c >= 0x600 && c <= 0x605) || c == 0x61c ||
         c == 0x6dd || c == 0x70f || c == 0x180e || (c >= 0x200b && c <= 0x200f) || (c >= 0x2028 && c <= 0x202e) ||
         (c >= 0x2060 && c <= 0x206f) || c == 0xfeff || (c >= 0xfff9 && c <= 0xfffb) || (c >= 0xe0000 && c <= 0xe007f);
}

std::string hex(const char* fmt, uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string escape(uint32_t c) {
  if (c == '\n') return "\\n";
  if (c == '\r') return "\\r";
  if (c == '\t') return "\\t";
  if (c < 0x100) return hex("\\x%02x", c);
  if (c < 0x10000) return hex("\\u%04x", c);
  return hex("\\U%08x", c);
}

// (escaped text, whether anything was escaped); `quoted` also escapes backslashes and single quotes.
std::string render(const std::string& s, bool quoted, bool* changed) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    uint32_t c = 0;
    int n = decode(s, i, &c);
    if (n == 0) {  // a byte that is not UTF-8
      out += hex("\\x%02x", uint8_t(s[i]));
      *changed = true;
      i += 1;
      continue;
    }
    if (needs_escape(c)) {
      out += escape(c);
      *changed = true;
    } else if (quoted && (c == '\\' || c == '\'')) {
      out += '\\';
      out += char(c);
    } else {
      out.append(s, i, n);
    }
    i += n;
  }
  return out;
}

}  // namespace

std::string show(const std::string& name) {
  bool changed = false;
  render(name, false, &changed);
  const bool padded = !name.empty() && (name.front() == ' ' || name.back() == ' ');
  if (!changed && !padded) return name;
  bool ignored = false;
  return "'" + render(name, true, &ignored) + "'";
}

std::string one_line(const std::string& text) {
  bool changed = false;
  return render(text, false, &changed);
}

}  // namespace decomcam
