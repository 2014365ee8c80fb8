// File names and messages as safe, single terminal lines (as runtime/names.py): a name is shown as it is when
// every character prints as itself, else in single quotes with control and format characters, line breaks
// and bytes that are not UTF-8 escaped; a message has its control characters escaped.
#pragma once
#include <string>

namespace decomcam {

std::string show(const std::string& name);
std::string one_line(const std::string& text);

}  // namespace decomcam
