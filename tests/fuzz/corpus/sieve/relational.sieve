require ["relational", "comparator-i;ascii-numeric", "envelope"];
if allof (envelope :localpart :is "to" "ted", not size :over 100K,
          header :count "ge" :comparator "i;ascii-numeric" ["to", "cc"] "3") {
  discard;
}
if exists ["list-id", "list-unsubscribe"] { keep; }
