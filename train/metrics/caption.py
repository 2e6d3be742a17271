"""Caption metrics with pycocoevalcap's CIDEr-D and BLEU scorers, tokenised as pycocoevalcap does without Java.

pycocoevalcap's ``PTBTokenizer`` writes all captions, one a line, to a file, runs
``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``
on it, splits each output line on spaces and drops the tokens in its ``PUNCTUATIONS`` list
(``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``). ``tokenize`` below re-implements that:
a longest-match lexer over the rules of CoreNLP 3.4.1's ``PTBLexer.flex`` in their order (ties go to
the earlier rule, trailing context counts toward the length, as in JFlex), with the options that command
line gives (ptb3Escaping defaults, americanize off, splitAssimilations on), then lower-casing, then the
same ``PUNCTUATIONS`` filter.

What it reproduces, for plain English captions (and checked against the real jar by the tests when Java
is installed):

* punctuation split off and dropped: . , ; : ? ! " ' ` ( ... ) and single/double hyphens; runs such as
  "!!", "?!" or "-----" are one token that is *not* in the list, so they stay;
* brackets become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-; after lower-casing "-lrb-" etc. no longer equal the
  upper-case entries of PUNCTUATIONS, so they stay in the text (and "-lsb-"/"-rsb-" were never listed);
* clitics split off: "don't" -> "do n't", "can't" -> "ca n't", "man's" -> "man 's", "they're" ->
  "they 're", "I'm" -> "i 'm"; "cannot" -> "can not", "gonna" -> "gon na" (likewise gotta, lemme, gimme,
  wanna), "'twas" -> "'t was";
* one token: hyphenated words ("black-and-white", "3-year-old"), numbers with . , : inside ("3.5",
  "1,000", "10:30"), fractions ("1/2", and "5 1/2" joined by a no-break space), slashed words ("and/or"),
  dates ("12/25/2015"), "o'clock", "rock 'n' roll"'s "'n'", abbreviations and acronyms with their
  period ("mr.", "st.", "etc.", "a.m.", "u.s.", even a single letter: "vitamin c." -> "vitamin c.");
* "$5" -> "$ 5", "5%" -> "5 %", "&" and other symbols are tokens of their own and stay; "&amp;" -> "&";
  curly quotes and dashes are mapped as PTB does (’s -> 's, – and — -> "--").

What it does not reproduce, or only approximately:

* context across captions. The jar lexes the whole batch, so a rule may look into the next caption's
  line: a caption ending in a single letter plus period ("vitamin c.") keeps "c." here, but the jar
  gives "c" when the next caption starts with "A ", "The ", "It " and the like (an acronym such as
  "U.S." keeps its period either way); "no." ("fig.", "ca." ...) at the end keeps its period only when
  the next caption starts with a digit. ``tokenize`` treats each caption as followed by a newline and a
  line that triggers none of this;
* the end of the batch's very last caption (no newline after it): a closing smiley (":)") or "'90"
  splits differently there;
* a carriage return or other line separator inside a caption: the jar makes it a line break, which
  shifts every later caption of the batch; here it is a space;
* text beyond Latin letters: Python's Unicode letter and digit classes (Unicode 14 here) stand in for
  JFlex's [:letter:] and [:digit:] (Java's tables, Unicode 6), [:uppercase:] is [A-Z] plus Latin-1
  capitals, and of the extra LETTER code points the flex file lists only those up to U+036F are copied;
* the SGML, URL, e-mail, phone and smiley rules are transcribed, but within one rule Python takes the
  first alternative that matches where JFlex takes the longest.

Checked while writing this: no difference from the jar on 90,000 random strings (caption words, numbers,
abbreviations, clitics, URLs, SGML tags, smileys, ASCII punctuation, curly quotes, dashes, fractions,
currency signs, random ASCII and some Latin-1 characters), each followed by a neutral line as said above.
"""
from __future__ import annotations

import re
import unicodedata

# Tokens pycocoevalcap.tokenizer.ptbtokenizer drops after tokenising.
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"})
# COCO caption metrics caption_scores leaves out: METEOR and SPICE run Java (SPICE also downloads Stanford
# models); ROUGE-L is simply not reported.
NOT_COMPUTED = ("METEOR", "ROUGE_L", "SPICE")

# ---- the macros of PTBLexer.flex (3.4.1) ----
# %caseless makes literal strings case-insensitive, never character classes: literals go in (?i:...).


def _numeric_non_digits() -> str:
    """A character class body of the BMP characters Python's \\w counts as alphanumeric that are neither
    letters nor decimal digits (categories Nl, No: "\u00bd", "\u00b2", ...), which Java's isLetter rejects."""
    word, codes = re.compile(r"[^\W\d_]"), []
    for i in range(0x10000):
        if word.match(chr(i)) and not unicodedata.category(chr(i)).startswith("L"):
            codes.append(i)
    ranges, start = [], None
    for k, i in enumerate(codes):
        start = i if start is None else start
        if k + 1 == len(codes) or codes[k + 1] != i + 1:
            ranges.append(f"\\u{start:04X}" + (f"-\\u{i:04X}" if i > start else ""))
            start = None
    return "".join(ranges)


_NL_NO = _numeric_non_digits()
_PLAIN_LETTER = rf"(?:(?![{_NL_NO}])[^\W\d_])"  # [:letter:] (Java's isLetter)
_LETTER = rf"(?:{_PLAIN_LETTER}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F])"
_DIGIT = r"\d"  # [:digit:] (Java's isDigit, Unicode category Nd)
_ALNUM = rf"(?:(?![{_NL_NO}])[^\W_])"  # [:letter:]|[:digit:]
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\u000B\u000C\u0085])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_UPPER = r"[A-Z\u00C0-\u00D6\u00D8-\u00DE]"
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*"
         r"(?:'[^']*'|\"[^\"]*\")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
_APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|(?i:&apos;))"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_WORD = rf"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_NUM = (rf"{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+", rf"{_DIGIT}+")
_ACRO = (r"[A-Za-z](?:\.[A-Za-z])*", r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s)",
         r"(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))")
_ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r)))"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00AD]+))+"
_INSENTP = r"[,;:\u3001]"
_ABMONTH = "jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec"
_ABDAYS = "mon|tues|tue|wed|thurs|thu|fri"
_ABSTATE = (r"(?i:ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn"
            r"|tenn|va|vt|wisc?|wyo)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)"
            r"|T(?i:ex)|W(?i:ash)")
_ABCOMP = r"(?i:inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys)|(?i:pp?t)[ye](?i:s?)"
_ABBREV1 = (rf"(?:(?i:{_ABMONTH}|{_ABDAYS})|{_ABSTATE}|{_ABCOMP}|(?i:tel|est|ext|sq)"
            r"|(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)|(?i:etc|al|seq|bldg))\.")
_ABTITLE = (r"(?i:mrs|mr|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt"
            r"|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle"
            r"|mme|msgr|sfc)|M(?i:iss)")
_ABBREV4 = (rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph|invt|elec|natl|dept)|(?i:m)[ft](?i:g)"
            rf"|{'|'.join(_ACRO)})")
_ABBREV3 = r"(?i:(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.)"
_ACRONYM_NEXT = ("About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He",
                 "Her", "Here", "However", "If", "In", "It", "Last", "Many", "More", "Mr.", "Ms.", "Now", "Once",
                 "One", "Other", "Our", "She", "Since", "So", "Some", "Such", "That", "The", "Their", "Then",
                 "There", "These", "They", "This", "We", "When", "While", "What", "Yet", "You")
_ACRONYM_CONTEXT = (rf"{_SPACENL}+(?:" + "|".join(w[0] + f"(?i:{re.escape(w[1:])})" if len(w) > 1 else w
                                                  for w in _ACRONYM_NEXT) + rf"|{_SGML}){_SPACENL}")
_PHONE = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
          r"[\- \u00A0]?[0-9]{3,5}",
          r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_FILENAME_EXT = ("bat|bmp|c|class|cgi|cpp|dll|docx|doc|exe|gif|gz|h|html|htm|jar|java|jpeg|jpg|mov|mp3|pdf|php"
                 "|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
_MISCSYMBOL = ("[+%&~^|\\\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0"
               "\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D"
               "\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B"
               "\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012"
               "\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")


# ---- the token transformations the rules apply ----
def _same(t: str) -> str:
    return t


def _soft(t: str) -> str:  # removeSoftHyphens
    return t.replace("\u00AD", "") or "-"


def _nbsp(t: str) -> str:  # normalizeSpace
    return t.replace(" ", "\u00A0")


def _parens(t: str) -> str:  # normalizeParentheses
    return t.replace("(", "-LRB-").replace(")", "-RRB-")


def _amp(t: str) -> str:  # normalizeAmpersandEntity
    return re.sub(r"(?i:&amp;)", "&", t)


_CURRENCY = (("\u00A2", "cents"), ("\u00A3", "#"), ("\u0080", "$"), ("\u00A4", "$"), ("\u20A0", "$"), ("\u20AC", "$"))
_FRACTIONS = (("\u00BC", "1/4"), ("\u00BD", "1/2"), ("\u00BE", "3/4"), ("\u2153", "1/3"), ("\u2154", "2/3"))


def _currency(t: str) -> str:
    for a, b in _CURRENCY:
        t = t.replace(a, b)
    return t


def _fractions(t: str) -> str:
    for a, b in _FRACTIONS:
        t = t.replace(a, b)
    return t


def _quotes(left: bool):  # handleQuotes with latexQuotes (the default)
    def handle(t: str) -> str:
        t = t.replace("&apos;", "'")
        t = re.sub("'", "`" if left else "'", t)
        t = re.sub('"|&quot;', "``" if left else "''", t)
        t = re.sub("[\u0091\u2018\u201B\u2039]", "`", t)
        t = re.sub("[\u0092\u2019\u203A]", "'", t)
        t = re.sub("[\u0093\u201C\u00AB]", "``", t)
        return re.sub("[\u0094\u201D\u00BB]", "''", t)
    return handle


def _hyphens(t: str) -> str:
    return "--" if 3 <= len(t) <= 4 else t


def _const(s: str):
    return lambda t: s


# ---- the rules, in PTBLexer.flex order: (pattern, trailing context or None, action, pushback) ----
# action None drops the match (white space, untokenisable characters). pushback n gives back the last n
# characters of the match to be lexed again; "again" makes the whole match the token and still lexes its
# final period again (so "etc." yields "etc." and "."); "acronym" is the ACRONYM rule's: "again", except
# that a two-character match ("I.") yields "I" and then ".".
_RULES_SRC = [
    (r"(?i:c\+\+)", None, _same, 0),
    (r"(?i:[cf]#)", None, _same, 0),
    (r"(?i:cannot)", None, _same, 3),
    (r"(?i:'twas)", None, _same, 3),
    (r"(?i:'tis)", None, _same, 2),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _same, 2),
    (_SGML, None, _nbsp, 0),
    (r"(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, _const("--"), 0),
    (r"(?i:&amp;)", None, _amp, 0),
    (r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, _same, 0),
    (_WORD, _REDAUX, _soft, 0),
    (_SWORD, _SREDAUX, _soft, 0),
    (_WORD, None, _soft, 0),
    # APOWORD, one alternative a rule
    (rf"{_APOS}(?i:n){_APOS}?", None, _same, 0),
    (rf"[lLdDjJ]{_APOS}", None, _same, 0),
    (rf"(?i:dunkin|somethin|ol){_APOS}", None, _same, 0),
    (rf"{_APOS}(?i:em)", None, _same, 0),
    (rf"[A-HJ-XZn]{_APOSETC}{_PLAIN_LETTER}{{2}}{_PLAIN_LETTER}*", None, _same, 0),
    (rf"{_APOS}[2-9](?i:0s)", None, _same, 0),
    (rf"{_APOS}(?i:till?)", None, _same, 0),
    (rf"{_PLAIN_LETTER}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_PLAIN_LETTER}*", None, _same, 0),
    (rf"{_APOS}(?i:cause)", None, _same, 0),
    (r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", None, _same, 0),
    (rf"(?i:o){_APOSETC}(?i:o)", None, _same, 0),
    (rf"(?i:y){_APOS}", _PLAIN_LETTER, _same, 0),  # APOWORD2
    (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _same, 0),  # FULLURL
    (r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
     r"(?i:com|net|org|edu))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None, _same, 0),  # LIKELYURL
    (r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
     r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?", None, _same, 0),  # EMAIL
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+", None, _same, 0),  # TWITTER
    (_REDAUX, r"[^A-Za-z]", _quotes(False), 0),
    (_SREDAUX, r"[^A-Za-z]", _quotes(False), 0),
    (rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}", None, _same, 0),  # DATE
    (rf"[\-+]?{_NUM[0]}", None, _soft, 0),  # NUMBER
    (rf"[\-+]?{_NUM[1]}", None, _soft, 0),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _same, 0),
    (rf"(?:{_DIGIT}{{1,4}}[- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}", None, _nbsp, 0),  # FRAC
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, _fractions, 0),  # FRAC2
    (rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
     rf"|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)", None, _amp, 0),  # TBSPEC
    (_THING3, None, _same, 0),
    (r"[A-Z]*\$|#", None, _same, 0),  # DOLSIGN
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", None, _currency, 0),
    (rf"(?:{_ACRO[0]})\.", _ACRONYM_CONTEXT, _same, "acronym"),
    (rf"(?:{_ACRO[1]})\.", _ACRONYM_CONTEXT, _same, "acronym"),
    (rf"(?:{_ACRO[2]})\.", _ACRONYM_CONTEXT, _same, "acronym"),
    (_ABBREV3, rf"{_SPACENL}?{_DIGIT}", _same, 0),
    (r"(?i:pt)[eyEY]\.|(?i:co\.)", rf"{_SPACE}(?i:ltd|lim)", _same, 0),
    (_ABBREV1, rf"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})", _same, "again"),
    (_ABBREV1, r"(?s:..)", _same, 0),
    (_ABBREV1, None, _same, "again"),
    (rf"{_ABBREV4}\.", None, _same, 0),  # ABBREV2
    (_ABBREV4, _SPACE, _same, 0),
    (_ACRO[0], _SPACENL, _same, 0),
    (_ACRO[1], _SPACENL, _same, 0),
    (_ACRO[2], _SPACENL, _same, 0),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _same, 0),  # TBSPEC2
    (rf"(?:{_LETTER}|{_DIGIT})+(?:\.(?:{_LETTER}|{_DIGIT})+)*\.(?i:{_FILENAME_EXT})", rf"{_SPACENL}|[.?!,]",
     _same, 0),  # FILENAME
    (rf"{_WORD}\.", _INSENTP, _soft, 0),
    (_PHONE[0], None, lambda t: _parens(_nbsp(t)), 0),
    (_PHONE[1], None, lambda t: _parens(_nbsp(t)), 0),
    (r'"|(?i:&quot;)', r"[A-Za-z0-9$]", _quotes(True), 0),
    (r'"|(?i:&quot;)', None, _quotes(False), 0),
    ("\x7f", None, None, 0),
    (r"<|(?i:&lt;)", None, _const("<"), 0),
    (r">|(?i:&gt;)", None, _const(">"), 0),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", _parens, 0),  # SMILEY
    (r"[\^x=~<>]\.\[\^x=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
     r"|\([\^x=~<>']-[\^x=~<>'`]\)", None, _parens, 0),  # ASIANSMILEY
    (r"\{", None, _const("-LCB-"), 0),
    (r"\}", None, _const("-RCB-"), 0),
    (r"\[", None, _const("-LSB-"), 0),
    (r"\]", None, _const("-RSB-"), 0),
    (r"\(", None, _const("-LRB-"), 0),
    (r"\)", None, _const("-RRB-"), 0),
    (r"-+", None, _hyphens, 0),  # HYPHENS
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _const("..."), 0),  # LDOTS
    (r"@+|#+|_+", None, _same, 0),  # FNMARKS
    (r"\*+|(?:\\\*){1,3}", None, _same, 0),  # ASTS
    (_INSENTP, None, _same, 0),
    (r"[?!]+", None, _same, 0),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _same, 0),
    ("=", None, _same, 0),
    ("/", None, _same, 0),
    (rf"{_HTHING}\.", _INSENTP, _soft, 0),
    (_HTHING, None, _soft, 0),
    (rf"{_THING}\.", _INSENTP, _same, 0),
    (_THING, None, _same, 0),
    (rf"{_THINGA}\.", _INSENTP, _amp, 0),
    (_THINGA, None, _amp, 0),
    ("'", r"[A-Za-z][^ \t\n\r\u00A0]", _quotes(True), 0),
    (_REDAUX, None, _quotes(False), 0),
    (_SREDAUX, None, _quotes(False), 0),
    (_APOS, None, _quotes(False), 0),  # QUOTES
    ("''", None, _quotes(False), 0),
    ("[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}",
     None, _quotes(False), 0),
    (r"<<|>>", None, _same, 0),  # FAKEDUCKFEET
    (_MISCSYMBOL, None, _same, 0),
    (rf"\x00|{_SPACE}+|[\u200B\u200E\u200F\uFEFF]", None, None, 0),
    (_NEWLINE, None, None, 0),  # a line break inside a caption: see the module docstring
    (r"(?i:&nbsp;)", None, None, 0),
    (r".", None, None, 0),  # untokenisable: dropped
]
_RULES = [(re.compile(f"(?:{p})(?=(?P<ctx>{c}))" if c else p), action, pushback)
          for p, c, action, pushback in _RULES_SRC]
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|$)")
_FAST_EXCLUDED = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})


def ptb_tokens(text: str) -> list[str]:
    """PTBLexer's tokens for one caption (before lower-casing and the punctuation filter)."""
    s = text + "\n"  # every caption but the batch's last is followed by a newline
    out: list[str] = []
    pos = 0
    while pos < len(text):
        fast = _FAST_WORD.match(s, pos)  # a plain word before a space: only WORD can take it
        if fast and fast.group().lower() not in _FAST_EXCLUDED:
            out.append(fast.group())
            pos = fast.end()
            continue
        best = None
        for rx, action, pushback in _RULES:
            m = rx.match(s, pos)
            if m is None:
                continue
            length = m.end() - pos + (len(m.group("ctx")) if "ctx" in rx.groupindex else 0)  # context counts
            if best is None or length > best[0]:
                best = (length, m, action, pushback)
        _, m, action, pushback = best
        text_matched = m.group()
        if pushback == "acronym":
            pushback = 1 if len(text_matched) == 2 else "again"
        if pushback == "again":
            out.append(action(text_matched))
            pos += len(text_matched) - 1
            continue
        consumed = len(text_matched) - pushback
        if action is not None:
            out.append(action(text_matched[:consumed]))
        pos += consumed
    return out


def tokenize(text: str) -> str:
    """One caption as pycocoevalcap's PTBTokenizer returns it: lower-cased PTB tokens, punctuation dropped."""
    tokens = (t.lower() for t in ptb_tokens(text.replace("\n", " ")))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def caption_scores(predictions: dict, references: dict) -> dict:
    """predictions: id -> caption; references: id -> [captions]. Returns CIDEr-D and BLEU-4 (x100) as
    floats, and under "not_computed" a list of the COCO metrics it does not compute (not a float: readers
    that format every value must skip it, as report.primary and export.info do)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    res = {k: [tokenize(v) or "empty"] for k, v in predictions.items()}
    gts = {k: [tokenize(r) for r in references[k]] for k in predictions}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": 100 * float(cider), "bleu4": 100 * float(bleu[3]), "not_computed": list(NOT_COMPUTED)}
